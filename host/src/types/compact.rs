//! The compact binary form of a [`Twin`]: how the registry holds every twin in memory and how
//! the store keeps it on disk (formats 3 and later), 121 bytes for the demo's machine with
//! five properties where the parsed form took kilobytes.
//!
//! Layout (integers are LEB128 varints unless said otherwise):
//! ```text
//! TAG | flags | lseq u64 LE | hlc u64 LE | [parent 16 B] | entity_type: name | version
//!     | created secs (zigzag) nanos | updated | [deleted_hlc]
//!     | vclock: n (origin: name, count)* | properties: n (name, value)*
//!     | clocks: [n] ([name] hlc − twin hlc (zigzag), origin: name, n, v)*
//!     | [siblings: n (name, m (value, clock)*)*]
//! ```
//! `flags` holds the lifecycle (bits 0–1) and which optional parts are present. `updated` is
//! `(updated − created secs (zigzag)) << 1 | 1` when it has the created time's nanoseconds,
//! else `… << 1` then its nanoseconds ([`F_UPDATED_SHORT`]; blobs of store formats 3–5
//! lack the flag and hold `secs nanos`). Clocks that follow the properties one for one are
//! written without count and names ([`F_CLOCKS_ALIGNED`]). The fixed
//! head lets [`lseq`], [`hlc`], [`lifecycle`] and [`parent_id`] read a blob without
//! decoding it. A *name* is `0, len, bytes` (inline) or `1 + number` (interned, see
//! [`super::intern`]): in memory names are interned, on disk ([`Names::Inline`]) they are
//! written out, since interned numbers belong to one process. Values are tagged: null,
//! booleans, small integers in the tag, u64, negative i64, f32 when exact, f64, short
//! strings with the length in the tag, strings, arrays and objects (keys inline), so integer
//! vs float, u64 above `i64::MAX` and key order come back exactly. The twin's id is not in
//! the blob (it is the map's and the store's key) and `children_ids` is derived.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Map, Number, Value};

use super::intern;
use super::{Clocks, Lifecycle, PropClock, Sibling, Twin, TwinId};

/// First byte of a compact twin. A JSON record (formats 1 and 2) starts with `{`.
pub const TAG: u8 = 0xC3;

const F_PARENT: u8 = 1 << 2;
const F_DELETED: u8 = 1 << 3;
const F_SIBLINGS: u8 = 1 << 4;
/// `updated` is written as one varint, `(updated − created seconds (zigzag)) << 1 | 1` when
/// its nanoseconds are `created`'s (then not written), else `… << 1` and the nanoseconds.
/// Set by every encoder since store format 6; blobs without it hold two varints.
const F_UPDATED_SHORT: u8 = 1 << 5;
/// The clocks are one per property, in the properties' order, without count or names.
const F_CLOCKS_ALIGNED: u8 = 1 << 6;
const HEAD: usize = 18;

/// Deepest nesting a decoder follows (values are checked at 32 levels on the way in; this
/// only stops a corrupt record from exhausting the stack).
const MAX_DECODE_DEPTH: usize = 256;

// Value tags.
const V_NULL: u8 = 0;
const V_FALSE: u8 = 1;
const V_TRUE: u8 = 2;
const V_U64: u8 = 3;
const V_NEG: u8 = 4;
const V_F64: u8 = 5;
const V_F32: u8 = 6;
const V_STR: u8 = 7;
const V_ARR: u8 = 8;
const V_OBJ: u8 = 9;
/// Tags `V_SMALL_INT..V_SHORT_STR` are the integers `0..` themselves.
const V_SMALL_INT: u8 = 16;
/// Tags from here are strings of `tag - V_SHORT_STR` bytes.
const V_SHORT_STR: u8 = 128;

/// How names are written: interned numbers (memory) or spelled out (disk).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Names {
    Interned,
    Inline,
}

/// Why bytes are not a compact twin.
#[derive(Debug, thiserror::Error)]
#[error("bad compact twin record: {0}")]
pub struct DecodeError(pub &'static str);

type R<T> = Result<T, DecodeError>;

// ---- encoding ---------------------------------------------------------------------------

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

fn name(out: &mut Vec<u8>, s: &str, names: Names) {
    if names == Names::Interned {
        if let Some(id) = intern::intern(s) {
            varint(out, id as u64 + 1);
            return;
        }
    }
    out.push(0);
    varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn time(out: &mut Vec<u8>, t: &DateTime<Utc>, base: i64) {
    varint(out, zigzag(t.timestamp().wrapping_sub(base)));
    varint(out, t.timestamp_subsec_nanos() as u64);
}

/// `updated` after `created` (see [`F_UPDATED_SHORT`]): a twin never changed since its
/// creation takes one byte where it took six.
fn updated_time(out: &mut Vec<u8>, updated: &DateTime<Utc>, created: &DateTime<Utc>) {
    let secs = zigzag(updated.timestamp().wrapping_sub(created.timestamp()));
    let nanos = updated.timestamp_subsec_nanos();
    if nanos == created.timestamp_subsec_nanos() {
        varint(out, secs << 1 | 1);
    } else {
        varint(out, secs << 1);
        varint(out, nanos as u64);
    }
}

fn value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.push(V_NULL),
        Value::Bool(false) => out.push(V_FALSE),
        Value::Bool(true) => out.push(V_TRUE),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                if u < (V_SHORT_STR - V_SMALL_INT) as u64 {
                    out.push(V_SMALL_INT + u as u8);
                } else {
                    out.push(V_U64);
                    varint(out, u);
                }
            } else if let Some(i) = n.as_i64() {
                // Negative (a non-negative one is a u64): store -(i + 1) >= 0.
                out.push(V_NEG);
                varint(out, !(i as u64));
            } else {
                let f = n.as_f64().unwrap_or(0.0);
                if (f as f32) as f64 == f {
                    out.push(V_F32);
                    out.extend_from_slice(&(f as f32).to_le_bytes());
                } else {
                    out.push(V_F64);
                    out.extend_from_slice(&f.to_le_bytes());
                }
            }
        }
        Value::String(s) => string(out, s),
        Value::Array(a) => {
            out.push(V_ARR);
            varint(out, a.len() as u64);
            for x in a {
                value(out, x);
            }
        }
        Value::Object(o) => {
            out.push(V_OBJ);
            varint(out, o.len() as u64);
            for (k, x) in o {
                varint(out, k.len() as u64);
                out.extend_from_slice(k.as_bytes());
                value(out, x);
            }
        }
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    if s.len() <= (u8::MAX - V_SHORT_STR) as usize {
        out.push(V_SHORT_STR + s.len() as u8);
    } else {
        out.push(V_STR);
        varint(out, s.len() as u64);
    }
    out.extend_from_slice(s.as_bytes());
}

fn clock(out: &mut Vec<u8>, c: &PropClock, twin_hlc: u64, names: Names) {
    varint(out, zigzag(c.hlc.wrapping_sub(twin_hlc) as i64));
    name(out, &c.origin, names);
    varint(out, c.n);
    varint(out, c.v);
}

/// Append the compact form of `t` to `out`.
pub fn encode_into(t: &Twin, out: &mut Vec<u8>, names: Names) {
    let mut flags = match t.lifecycle {
        Lifecycle::Active => 0,
        Lifecycle::Suspended => 1,
        Lifecycle::Retired => 2,
    };
    if t.parent_id.is_some() {
        flags |= F_PARENT;
    }
    if t.deleted_hlc != 0 {
        flags |= F_DELETED;
    }
    if t.siblings.is_some() {
        flags |= F_SIBLINGS;
    }
    flags |= F_UPDATED_SHORT;
    // Clocks named as the properties, in their order (a twin whose every property has a
    // clock): the names are not written again.
    let aligned = t.clocks.len() == t.properties.len()
        && t.clocks
            .keys()
            .zip(t.properties.keys())
            .all(|(c, p)| c == p);
    if aligned {
        flags |= F_CLOCKS_ALIGNED;
    }
    out.push(TAG);
    out.push(flags);
    out.extend_from_slice(&t.lseq.to_le_bytes());
    out.extend_from_slice(&t.hlc.to_le_bytes());
    if let Some(p) = t.parent_id {
        out.extend_from_slice(p.as_bytes());
    }
    name(out, &t.entity_type, names);
    varint(out, t.version);
    time(out, &t.created_at, 0);
    updated_time(out, &t.updated_at, &t.created_at);
    if t.deleted_hlc != 0 {
        varint(out, t.deleted_hlc);
    }
    varint(out, t.vclock.len() as u64);
    for (node, n) in &t.vclock {
        name(out, node, names);
        varint(out, *n);
    }
    varint(out, t.properties.len() as u64);
    for (k, v) in &t.properties {
        name(out, k, names);
        value(out, v);
    }
    if !aligned {
        varint(out, t.clocks.len() as u64);
    }
    for (k, c) in t.clocks.iter() {
        if !aligned {
            name(out, k, names);
        }
        clock(out, c, t.hlc, names);
    }
    if let Some(s) = &t.siblings {
        varint(out, s.len() as u64);
        for (k, writes) in s.iter() {
            name(out, k, names);
            varint(out, writes.len() as u64);
            for w in writes {
                value(out, &w.value);
                clock(out, &w.clock, t.hlc, names);
            }
        }
    }
}

/// The compact form of `t`, sized to fit.
pub fn encode(t: &Twin, names: Names) -> Box<[u8]> {
    let mut out = Vec::with_capacity(160);
    encode_into(t, &mut out, names);
    out.into_boxed_slice()
}

/// Append `b` (a compact twin, names interned or inline) to `out` with its names written as
/// `to` says, without decoding the twin: values, clocks and times are copied as they are.
/// This is how a twin goes to disk (checkpoints) and comes back (the load), each a copy plus
/// a look-up per name where decoding and encoding built the whole twin.
pub fn transcode(b: &[u8], to: Names, out: &mut Vec<u8>) -> R<()> {
    let mut t = Transcoder {
        r: Reader { b, at: 0 },
        from: 0,
        to,
        out,
    };
    let h = t.r.head()?;
    t.name()?; // entity type
    t.r.varint()?; // version
    t.r.skip_times(h.flags)?;
    if h.flags & F_DELETED != 0 {
        t.r.varint()?;
    }
    for _ in 0..t.r.len()? {
        t.name()?;
        t.r.varint()?;
    }
    let props = t.r.len()?;
    for _ in 0..props {
        t.name()?;
        t.r.skip_value(0)?;
    }
    if h.flags & F_CLOCKS_ALIGNED != 0 {
        for _ in 0..props {
            t.clock()?;
        }
    } else {
        for _ in 0..t.r.len()? {
            t.name()?;
            t.clock()?;
        }
    }
    if h.flags & F_SIBLINGS != 0 {
        for _ in 0..t.r.len()? {
            t.name()?;
            for _ in 0..t.r.len()? {
                t.r.skip_value(0)?;
                t.clock()?;
            }
        }
    }
    if t.r.at != b.len() {
        return Err(DecodeError("trailing bytes"));
    }
    t.out.extend_from_slice(&b[t.from..]);
    Ok(())
}

/// [`transcode`]'s state: `r` reads, and the bytes from `from` to `r.at` are still to copy.
struct Transcoder<'a, 'o> {
    r: Reader<'a>,
    from: usize,
    to: Names,
    out: &'o mut Vec<u8>,
}

impl Transcoder<'_, '_> {
    /// Copy what was read up to here, then the next name in the wanted form.
    fn name(&mut self) -> R<()> {
        let start = self.r.at;
        self.out.extend_from_slice(&self.r.b[self.from..start]);
        match self.r.varint()? {
            0 => {
                let n = self.r.len()?;
                let s = self.r.str(n)?;
                if self.to == Names::Inline {
                    self.out.extend_from_slice(&self.r.b[start..self.r.at]);
                } else {
                    name(self.out, s, Names::Interned);
                }
            }
            id => {
                let s = intern::name((id - 1) as u32).ok_or(DecodeError("unknown name number"))?;
                name(self.out, s, self.to);
            }
        }
        self.from = self.r.at;
        Ok(())
    }

    /// A property clock: its HLC offset, origin (a name) and dot.
    fn clock(&mut self) -> R<()> {
        self.r.varint()?;
        self.name()?;
        self.r.varint()?;
        self.r.varint()?;
        Ok(())
    }
}

// ---- decoding ---------------------------------------------------------------------------

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    #[inline]
    fn byte(&mut self) -> R<u8> {
        let x = *self.b.get(self.at).ok_or(DecodeError("truncated"))?;
        self.at += 1;
        Ok(x)
    }

    #[inline]
    fn bytes(&mut self, n: usize) -> R<&'a [u8]> {
        let end = self.at.checked_add(n).ok_or(DecodeError("length"))?;
        let s = self.b.get(self.at..end).ok_or(DecodeError("truncated"))?;
        self.at = end;
        Ok(s)
    }

    /// A varint; one byte (most of them: counts, names, small numbers) without a loop.
    #[inline]
    fn varint(&mut self) -> R<u64> {
        match self.b.get(self.at) {
            Some(&x) if x < 0x80 => {
                self.at += 1;
                Ok(x as u64)
            }
            _ => self.varint_long(),
        }
    }

    fn varint_long(&mut self) -> R<u64> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let x = self.byte()?;
            n |= ((x & 0x7f) as u64) << shift;
            if x < 0x80 {
                return Ok(n);
            }
        }
        Err(DecodeError("varint too long"))
    }

    #[inline]
    fn len(&mut self) -> R<usize> {
        let n = self.varint()? as usize;
        // Every item takes at least one byte: a count beyond what is left is corrupt (and
        // would make a huge allocation).
        if n > self.b.len() - self.at {
            return Err(DecodeError("count beyond the record"));
        }
        Ok(n)
    }

    fn str(&mut self, n: usize) -> R<&'a str> {
        std::str::from_utf8(self.bytes(n)?).map_err(|_| DecodeError("not utf-8"))
    }

    fn u64_le(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(
            self.bytes(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// A name: the interned one (shared) or an inline one (shared when it can be).
    fn name(&mut self) -> R<Arc<str>> {
        match self.varint()? {
            0 => {
                let n = self.len()?;
                Ok(intern::shared(self.str(n)?))
            }
            id => intern::name((id - 1) as u32)
                .cloned()
                .ok_or(DecodeError("unknown name number")),
        }
    }

    /// A name as a fresh string (no interning of inline names).
    fn name_string(&mut self) -> R<String> {
        match self.varint()? {
            0 => {
                let n = self.len()?;
                Ok(self.str(n)?.to_owned())
            }
            id => intern::name((id - 1) as u32)
                .map(|n| n.to_string())
                .ok_or(DecodeError("unknown name number")),
        }
    }

    /// Whether the next name is `want` (its number, when interned), consuming it.
    #[inline]
    fn name_is(&mut self, want: &str, want_id: Option<u32>) -> R<bool> {
        match self.varint()? {
            0 => {
                let n = self.len()?;
                Ok(self.str(n)? == want)
            }
            id => Ok(want_id == Some((id - 1) as u32)),
        }
    }

    fn time(&mut self, base: i64) -> R<DateTime<Utc>> {
        let secs = unzigzag(self.varint()?).wrapping_add(base);
        let nanos = u32::try_from(self.varint()?).map_err(|_| DecodeError("nanoseconds"))?;
        DateTime::from_timestamp(secs, nanos).ok_or(DecodeError("time out of range"))
    }

    /// Past the created and updated times without building them.
    fn skip_times(&mut self, flags: u8) -> R<()> {
        self.varint()?; // created: seconds, nanoseconds
        self.varint()?;
        if flags & F_UPDATED_SHORT == 0 {
            self.varint()?; // updated: seconds, nanoseconds
            self.varint()?;
        } else if self.varint()? & 1 == 0 {
            self.varint()?; // updated nanoseconds, not the created ones
        }
        Ok(())
    }

    /// From just after the version, past the times, the deletion clock and the vector
    /// clock: to the property count.
    fn skip_to_props(&mut self, flags: u8) -> R<()> {
        self.skip_times(flags)?;
        if flags & F_DELETED != 0 {
            self.varint()?;
        }
        for _ in 0..self.len()? {
            self.name_is("", None)?;
            self.varint()?;
        }
        Ok(())
    }

    /// The created and updated times (written as `flags` says).
    fn times(&mut self, flags: u8) -> R<(DateTime<Utc>, DateTime<Utc>)> {
        let created = self.time(0)?;
        if flags & F_UPDATED_SHORT == 0 {
            return Ok((created, self.time(created.timestamp())?));
        }
        let v = self.varint()?;
        let secs = unzigzag(v >> 1).wrapping_add(created.timestamp());
        let nanos = if v & 1 == 1 {
            created.timestamp_subsec_nanos()
        } else {
            u32::try_from(self.varint()?).map_err(|_| DecodeError("nanoseconds"))?
        };
        let updated =
            DateTime::from_timestamp(secs, nanos).ok_or(DecodeError("time out of range"))?;
        Ok((created, updated))
    }

    fn value(&mut self, depth: usize) -> R<Value> {
        if depth > MAX_DECODE_DEPTH {
            return Err(DecodeError("nested too deep"));
        }
        Ok(match self.byte()? {
            V_NULL => Value::Null,
            V_FALSE => Value::Bool(false),
            V_TRUE => Value::Bool(true),
            V_U64 => Value::Number(self.varint()?.into()),
            V_NEG => Value::Number((!self.varint()? as i64).into()),
            V_F64 => float(f64::from_le_bytes(
                self.bytes(8)?.try_into().expect("8 bytes"),
            )),
            V_F32 => float(f32::from_le_bytes(self.bytes(4)?.try_into().expect("4 bytes")) as f64),
            V_STR => {
                let n = self.len()?;
                Value::String(self.str(n)?.to_owned())
            }
            V_ARR => {
                let n = self.len()?;
                let mut a = Vec::with_capacity(n);
                for _ in 0..n {
                    a.push(self.value(depth + 1)?);
                }
                Value::Array(a)
            }
            V_OBJ => {
                let n = self.len()?;
                let mut o = Map::new();
                for _ in 0..n {
                    let k = self.len()?;
                    let k = self.str(k)?.to_owned();
                    o.insert(k, self.value(depth + 1)?);
                }
                Value::Object(o)
            }
            t if t >= V_SHORT_STR => {
                Value::String(self.str((t - V_SHORT_STR) as usize)?.to_owned())
            }
            t if t >= V_SMALL_INT => Value::Number(((t - V_SMALL_INT) as u64).into()),
            _ => return Err(DecodeError("unknown value tag")),
        })
    }

    /// Step over a value without building it.
    fn skip_value(&mut self, depth: usize) -> R<()> {
        if depth > MAX_DECODE_DEPTH {
            return Err(DecodeError("nested too deep"));
        }
        match self.byte()? {
            V_NULL | V_FALSE | V_TRUE => {}
            V_U64 | V_NEG => {
                self.varint()?;
            }
            V_F64 => {
                self.bytes(8)?;
            }
            V_F32 => {
                self.bytes(4)?;
            }
            V_STR => {
                let n = self.len()?;
                self.bytes(n)?;
            }
            V_ARR => {
                for _ in 0..self.len()? {
                    self.skip_value(depth + 1)?;
                }
            }
            V_OBJ => {
                for _ in 0..self.len()? {
                    let k = self.len()?;
                    self.bytes(k)?;
                    self.skip_value(depth + 1)?;
                }
            }
            t if t >= V_SHORT_STR => {
                self.bytes((t - V_SHORT_STR) as usize)?;
            }
            t if t >= V_SMALL_INT => {}
            _ => return Err(DecodeError("unknown value tag")),
        }
        Ok(())
    }

    fn clock(&mut self, twin_hlc: u64) -> R<PropClock> {
        let hlc = twin_hlc.wrapping_add(unzigzag(self.varint()?) as u64);
        Ok(PropClock {
            hlc,
            origin: self.name()?,
            n: self.varint()?,
            v: self.varint()?,
        })
    }

    /// Read the head and the fields before the properties; positions at the property count.
    fn head(&mut self) -> R<Head> {
        if self.byte()? != TAG {
            return Err(DecodeError("not a compact twin"));
        }
        let flags = self.byte()?;
        let lseq = self.u64_le()?;
        let hlc = self.u64_le()?;
        let parent_id = if flags & F_PARENT != 0 {
            let b: [u8; 16] = self.bytes(16)?.try_into().expect("16 bytes");
            Some(TwinId(uuid::Uuid::from_bytes(b)))
        } else {
            None
        };
        Ok(Head {
            flags,
            lseq,
            hlc,
            parent_id,
        })
    }
}

struct Head {
    flags: u8,
    lseq: u64,
    hlc: u64,
    parent_id: Option<TwinId>,
}

fn float(f: f64) -> Value {
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

fn lifecycle_of(flags: u8) -> R<Lifecycle> {
    match flags & 3 {
        0 => Ok(Lifecycle::Active),
        1 => Ok(Lifecycle::Suspended),
        2 => Ok(Lifecycle::Retired),
        _ => Err(DecodeError("lifecycle")),
    }
}

/// The twin `id` whose compact form is `b` (names interned or inline).
pub fn decode(id: TwinId, b: &[u8]) -> R<Twin> {
    let mut r = Reader { b, at: 0 };
    let h = r.head()?;
    let entity_type = r.name_string()?;
    let version = r.varint()?;
    let (created_at, updated_at) = r.times(h.flags)?;
    let deleted_hlc = if h.flags & F_DELETED != 0 {
        r.varint()?
    } else {
        0
    };
    let mut vclock = BTreeMap::new();
    for _ in 0..r.len()? {
        let node = r.name_string()?;
        vclock.insert(node, r.varint()?);
    }
    let mut properties = Map::new();
    let aligned = h.flags & F_CLOCKS_ALIGNED != 0;
    // With aligned clocks, the properties' names are the clocks' too.
    let mut names = Vec::new();
    for _ in 0..r.len()? {
        let k = if aligned {
            let k = r.name()?;
            names.push(k.clone());
            k.to_string()
        } else {
            r.name_string()?
        };
        properties.insert(k, r.value(0)?);
    }
    let clocks = if aligned {
        let mut clocks = Vec::with_capacity(names.len());
        for k in names {
            clocks.push((k, r.clock(h.hlc)?));
        }
        clocks
    } else {
        let n = r.len()?;
        let mut clocks = Vec::with_capacity(n);
        for _ in 0..n {
            let k = r.name()?;
            clocks.push((k, r.clock(h.hlc)?));
        }
        clocks
    };
    let siblings = if h.flags & F_SIBLINGS != 0 {
        let mut s = BTreeMap::new();
        for _ in 0..r.len()? {
            let k = r.name_string()?;
            let m = r.len()?;
            let mut writes = Vec::with_capacity(m);
            for _ in 0..m {
                let value = r.value(0)?;
                writes.push(Sibling {
                    value,
                    clock: r.clock(h.hlc)?,
                });
            }
            s.insert(k, writes);
        }
        Some(Box::new(s))
    } else {
        None
    };
    if r.at != b.len() {
        return Err(DecodeError("trailing bytes"));
    }
    Ok(Twin {
        id,
        entity_type,
        properties,
        version,
        vclock,
        parent_id: h.parent_id,
        children_ids: BTreeSet::new(),
        lifecycle: lifecycle_of(h.flags)?,
        created_at,
        updated_at,
        hlc: h.hlc,
        lseq: h.lseq,
        clocks: Clocks(clocks),
        deleted_hlc,
        siblings,
    })
}

/// A twin record as the store holds it: compact (format 3) or JSON (formats 1 and 2).
pub fn decode_stored(id: TwinId, b: &[u8]) -> Result<Twin, String> {
    if b.first() == Some(&TAG) {
        decode(id, b).map_err(|e| e.to_string())
    } else {
        crate::store::wal::from_slice_unbounded::<Twin>(b).map_err(|e| e.to_string())
    }
}

// ---- reading without decoding -----------------------------------------------------------

fn head_u64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map_or(0, |s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

/// The change number of a compact twin's last change.
pub fn lseq(b: &[u8]) -> u64 {
    head_u64(b, 2)
}

/// The HLC of a compact twin's last change.
pub fn hlc(b: &[u8]) -> u64 {
    head_u64(b, 10)
}

/// A compact twin's lifecycle state.
pub fn lifecycle(b: &[u8]) -> Lifecycle {
    b.get(1)
        .and_then(|f| lifecycle_of(*f).ok())
        .unwrap_or_default()
}

/// Whether a compact twin holds siblings (an open conflict).
pub fn has_siblings(b: &[u8]) -> bool {
    b.get(1).is_some_and(|f| f & F_SIBLINGS != 0)
}

/// A compact twin's parent.
pub fn parent_id(b: &[u8]) -> Option<TwinId> {
    let f = *b.get(1)?;
    if f & F_PARENT == 0 {
        return None;
    }
    let id: [u8; 16] = b.get(HEAD..HEAD + 16)?.try_into().ok()?;
    Some(TwinId(uuid::Uuid::from_bytes(id)))
}

/// A compact twin's entity type.
pub fn entity_type(b: &[u8]) -> String {
    entity_type_ref(b).to_owned()
}

/// A compact twin's entity type, borrowed (no allocation: for hot paths).
pub fn entity_type_ref(b: &[u8]) -> &str {
    let mut r = Reader { b, at: 0 };
    r.head().and_then(|_| r.name_ref()).unwrap_or_default()
}

/// Whether a compact twin's entity type is `et` (compares interned numbers when it can).
pub fn entity_type_is(b: &[u8], et: &str) -> bool {
    entity_type_is_numbered(b, et, intern::lookup(et))
}

/// [`entity_type_is`] with `et`'s interned number looked up once by the caller (for a
/// loop over many twins).
pub fn entity_type_is_numbered(b: &[u8], et: &str, number: Option<u32>) -> bool {
    let mut r = Reader { b, at: 0 };
    r.head().is_ok() && r.name_is(et, number).unwrap_or(false)
}

// ---- serving without decoding -----------------------------------------------------------

impl<'a> Reader<'a> {
    /// A name, borrowed (interned names live as long as the process).
    fn name_ref(&mut self) -> R<&'a str> {
        match self.varint()? {
            0 => {
                let n = self.len()?;
                self.str(n)
            }
            id => intern::name((id - 1) as u32)
                .map(|n| &**n)
                .ok_or(DecodeError("unknown name number")),
        }
    }

    /// The bytes of the next value (stepped over).
    fn value_bytes(&mut self, depth: usize) -> R<&'a [u8]> {
        let start = self.at;
        self.skip_value(depth)?;
        Ok(&self.b[start..self.at])
    }
}

/// One encoded value, serialized as the JSON value it stands for.
struct ValueSer<'a>(&'a [u8], usize);

impl serde::Serialize for ValueSer<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeMap, SerializeSeq};
        let e = |d: DecodeError| S::Error::custom(d);
        let mut r = Reader { b: self.0, at: 0 };
        let depth = self.1;
        match r.byte().map_err(e)? {
            V_NULL => s.serialize_unit(),
            V_FALSE => s.serialize_bool(false),
            V_TRUE => s.serialize_bool(true),
            V_U64 => s.serialize_u64(r.varint().map_err(e)?),
            V_NEG => s.serialize_i64(!r.varint().map_err(e)? as i64),
            V_F64 => s.serialize_f64(f64::from_le_bytes(
                r.bytes(8).map_err(e)?.try_into().expect("8 bytes"),
            )),
            V_F32 => s.serialize_f64(f32::from_le_bytes(
                r.bytes(4).map_err(e)?.try_into().expect("4 bytes"),
            ) as f64),
            V_STR => {
                let n = r.len().map_err(e)?;
                s.serialize_str(r.str(n).map_err(e)?)
            }
            V_ARR => {
                let n = r.len().map_err(e)?;
                let mut seq = s.serialize_seq(Some(n))?;
                for _ in 0..n {
                    seq.serialize_element(&ValueSer(
                        r.value_bytes(depth + 1).map_err(e)?,
                        depth + 1,
                    ))?;
                }
                seq.end()
            }
            V_OBJ => {
                let n = r.len().map_err(e)?;
                let mut map = s.serialize_map(Some(n))?;
                for _ in 0..n {
                    let k = r.len().map_err(e)?;
                    let k = r.str(k).map_err(e)?;
                    map.serialize_entry(
                        k,
                        &ValueSer(r.value_bytes(depth + 1).map_err(e)?, depth + 1),
                    )?;
                }
                map.end()
            }
            t if t >= V_SHORT_STR => s.serialize_str(r.str((t - V_SHORT_STR) as usize).map_err(e)?),
            t if t >= V_SMALL_INT => s.serialize_u64((t - V_SMALL_INT) as u64),
            _ => Err(S::Error::custom("unknown value tag")),
        }
    }
}

/// The properties section of a compact twin (at its count), serialized as a JSON object.
struct PropsSer<'a> {
    b: &'a [u8],
    at: usize,
}

impl serde::Serialize for PropsSer<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeMap};
        let e = |d: DecodeError| S::Error::custom(d);
        let mut r = Reader {
            b: self.b,
            at: self.at,
        };
        let n = r.len().map_err(e)?;
        let mut map = s.serialize_map(Some(n))?;
        for _ in 0..n {
            let k = r.name_ref().map_err(e)?;
            map.serialize_entry(k, &ValueSer(r.value_bytes(0).map_err(e)?, 0))?;
        }
        map.end()
    }
}

/// A compact twin served as its JSON (the fields of [`Twin`]'s served form, in its order),
/// written straight from the blob: no decoded twin, no tree of JSON values.
pub struct Served<'a> {
    pub id: TwinId,
    pub blob: &'a [u8],
    pub children_ids: &'a BTreeSet<TwinId>,
}

impl serde::Serialize for Served<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeStruct};
        let e = |d: DecodeError| S::Error::custom(d);
        let mut r = Reader {
            b: self.blob,
            at: 0,
        };
        let h = r.head().map_err(e)?;
        let entity_type = r.name_ref().map_err(e)?;
        let version = r.varint().map_err(e)?;
        let (created_at, updated_at) = r.times(h.flags).map_err(e)?;
        if h.flags & F_DELETED != 0 {
            r.varint().map_err(e)?;
        }
        let n = r.len().map_err(e)?;
        let mut vclock = Vec::with_capacity(n);
        for _ in 0..n {
            let node = r.name_ref().map_err(e)?;
            vclock.push((node, r.varint().map_err(e)?));
        }
        struct VClockSer<'a>(Vec<(&'a str, u64)>);
        impl serde::Serialize for VClockSer<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
            }
        }
        let mut st = s.serialize_struct("Twin", 10)?;
        st.serialize_field("id", &self.id)?;
        st.serialize_field("entity_type", entity_type)?;
        st.serialize_field(
            "properties",
            &PropsSer {
                b: self.blob,
                at: r.at,
            },
        )?;
        st.serialize_field("version", &version)?;
        st.serialize_field("vclock", &VClockSer(vclock))?;
        st.serialize_field("parent_id", &h.parent_id)?;
        st.serialize_field("children_ids", self.children_ids)?;
        st.serialize_field("lifecycle", &lifecycle_of(h.flags).map_err(e)?)?;
        st.serialize_field("created_at", &created_at)?;
        st.serialize_field("updated_at", &updated_at)?;
        st.end()
    }
}

/// What a guest is handed of a twin (`twin` of the WIT interface): its type, version, parent
/// and properties as JSON text, read straight from the blob (no decoded twin, no tree of
/// JSON values: a behavior's event is built from this on every call).
pub struct Outline<'a> {
    pub entity_type: &'a str,
    pub version: u64,
    pub parent_id: Option<TwinId>,
    pub properties_json: String,
}

/// The [`Outline`] of compact twin `b`.
pub fn outline(b: &[u8]) -> R<Outline<'_>> {
    let mut r = Reader { b, at: 0 };
    let h = r.head()?;
    let entity_type = r.name_ref()?;
    let version = r.varint()?;
    r.skip_to_props(h.flags)?;
    let properties_json =
        serde_json::to_string(&PropsSer { b, at: r.at }).map_err(|_| DecodeError("properties"))?;
    Ok(Outline {
        entity_type,
        version,
        parent_id: h.parent_id,
        properties_json,
    })
}

/// The varint at `at` in `b` and where it ends ([`Reader::varint`]).
#[inline(always)]
fn varint_at(b: &[u8], at: usize) -> Option<(u64, usize)> {
    let mut r = Reader { b, at };
    let v = r.varint().ok()?;
    Some((v, r.at))
}

/// Where the value at `at` in `b` ends: scalars and short strings inline, the rest by
/// [`Reader::skip_value`].
#[inline(always)]
fn skip_value_at(b: &[u8], at: usize) -> Option<usize> {
    let fixed = match *b.get(at)? {
        t if t >= V_SHORT_STR => (t - V_SHORT_STR) as usize,
        t if t >= V_SMALL_INT => 0,
        V_NULL | V_FALSE | V_TRUE => 0,
        V_F32 => 4,
        V_F64 => 8,
        _ => {
            let mut r = Reader { b, at };
            r.skip_value(0).ok()?;
            return Some(r.at);
        }
    };
    let end = at + 1 + fixed;
    (end <= b.len()).then_some(end)
}

/// Where the property count of compact twin `b` is (see [`Props::at`]).
pub fn props_offset(b: &[u8]) -> R<usize> {
    Props::of(b).map(|p| p.at)
}

/// A property value read in place by [`Props::scalar`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scalar<'a> {
    Null,
    Bool(bool),
    Num(f64),
    Str(&'a str),
    /// An array or an object: decode it ([`Props::get`]) to look inside.
    Other,
}

impl Scalar<'_> {
    /// Whether the value equals `v` as the query's equality has it (`1` = `1.0`); `None` for
    /// [`Scalar::Other`], which this cannot tell.
    pub fn eq_json(self, v: &Value) -> Option<bool> {
        Some(match (self, v) {
            (Scalar::Other, _) => return None,
            (Scalar::Null, Value::Null) => true,
            (Scalar::Bool(a), Value::Bool(b)) => a == *b,
            (Scalar::Num(a), Value::Number(b)) => a.is_finite() && b.as_f64() == Some(a),
            (Scalar::Str(a), Value::String(b)) => a == b,
            _ => false,
        })
    }
}

/// Property lookups on a compact twin that decode only the values asked for.
pub struct Props<'a> {
    b: &'a [u8],
    /// Where the property count is.
    at: usize,
}

impl<'a> Props<'a> {
    /// The properties of compact twin `b`.
    pub fn of(b: &'a [u8]) -> R<Props<'a>> {
        let mut r = Reader { b, at: 0 };
        let h = r.head()?;
        r.name_is("", None)?;
        r.varint()?;
        r.skip_to_props(h.flags)?;
        Ok(Props { b, at: r.at })
    }

    /// The properties of compact twin `b` whose property count is at `at`, as
    /// [`props_offset`] found it (a holder of many twins keeps it with each, so that a query
    /// does not walk every twin's head again). A wrong `at` reads wrong values, never out of
    /// bounds.
    pub fn at(b: &'a [u8], at: usize) -> Props<'a> {
        Props { b, at }
    }

    /// A reader at the value of property `name`; `None` when the twin has no such property.
    #[inline]
    fn find(&self, name: &str, id: Option<u32>) -> Option<Reader<'a>> {
        Some(Reader {
            b: self.b,
            at: self.find_at(name, id)?,
        })
    }

    /// Where the value of property `name` (interned as `id`) is. Every query reads twins
    /// through here, so the common cases (one-byte varints, interned names, scalars and
    /// short strings) are stepped over inline, without a [`Reader`].
    #[inline]
    fn find_at(&self, name: &str, id: Option<u32>) -> Option<usize> {
        let b = self.b;
        let (n, mut at) = varint_at(b, self.at)?;
        for _ in 0..n {
            let (k, next) = varint_at(b, at)?;
            at = next;
            let hit = match k {
                0 => {
                    let (len, next) = varint_at(b, at)?;
                    let end = next.checked_add(usize::try_from(len).ok()?)?;
                    at = end;
                    b.get(next..end)? == name.as_bytes()
                }
                k => id.is_some_and(|id| u64::from(id) + 1 == k),
            };
            if hit {
                return Some(at);
            }
            at = skip_value_at(b, at)?;
        }
        None
    }
    /// The value of property `name` read in place, without building it: scalars as they
    /// are, arrays and objects as [`Scalar::Other`]; `None` when the twin has no such property.
    pub fn scalar(&self, name: &str) -> Option<Scalar<'a>> {
        self.scalar_numbered(name, intern::lookup(name))
    }

    /// [`Props::scalar`] with `name`'s interned number looked up once by the caller.
    pub fn scalar_numbered(&self, name: &str, number: Option<u32>) -> Option<Scalar<'a>> {
        let mut r = self.find(name, number)?;
        Some(match r.byte().ok()? {
            V_NULL => Scalar::Null,
            V_FALSE => Scalar::Bool(false),
            V_TRUE => Scalar::Bool(true),
            V_U64 => Scalar::Num(r.varint().ok()? as f64),
            V_NEG => Scalar::Num((!r.varint().ok()? as i64) as f64),
            V_F64 => Scalar::Num(f64::from_le_bytes(r.bytes(8).ok()?.try_into().ok()?)),
            V_F32 => Scalar::Num(f32::from_le_bytes(r.bytes(4).ok()?.try_into().ok()?) as f64),
            V_STR => {
                let n = r.len().ok()?;
                Scalar::Str(r.str(n).ok()?)
            }
            V_ARR | V_OBJ => Scalar::Other,
            t if t >= V_SHORT_STR => Scalar::Str(r.str((t - V_SHORT_STR) as usize).ok()?),
            t if t >= V_SMALL_INT => Scalar::Num((t - V_SMALL_INT) as f64),
            _ => return None,
        })
    }

    /// Whether string property `name` (interned as `number`) is `want`, compared as bytes
    /// in place; `None` when the twin has no such property or it is not a string.
    pub fn str_is(&self, name: &str, number: Option<u32>, want: &str) -> Option<bool> {
        let b = self.b;
        let at = self.find_at(name, number)?;
        let (start, n) = match *b.get(at)? {
            t if t >= V_SHORT_STR => (at + 1, (t - V_SHORT_STR) as usize),
            V_STR => {
                let (n, start) = varint_at(b, at + 1)?;
                (start, usize::try_from(n).ok()?)
            }
            _ => return None,
        };
        // Equal bytes are `want`'s, valid UTF-8: no need to check them first.
        Some(b.get(start..start.checked_add(n)?)? == want.as_bytes())
    }

    /// The value of property `name`, decoded; `None` when the twin has no such property.
    pub fn get(&self, name: &str) -> Option<Value> {
        self.get_numbered(name, intern::lookup(name))
    }

    /// [`Props::get`] with `name`'s interned number looked up once by the caller.
    pub fn get_numbered(&self, name: &str, number: Option<u32>) -> Option<Value> {
        self.find(name, number)?.value(0).ok()
    }
}

#[cfg(test)]
#[path = "compact_tests.rs"]
mod tests;
