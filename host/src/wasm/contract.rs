//! The WIT contract, checked on an uploaded component's types before anything is compiled.
//!
//! A component carries its own type information; `wit-parser` decodes it into a WIT world in
//! milliseconds, where compiling the component's code with Cranelift can take many seconds
//! (an 18 MB Python component: ~10 s in a debug build). So an upload is refused from its
//! types alone when it exports none of the host's worlds, exports one with another signature,
//! or imports something the host does not provide. What passes is compiled and then checked
//! once more, exactly, by wasmtime's linker (`instantiate_pre`).

use wit_parser::decoding::{decode, DecodedWasm};
use wit_parser::{Function, InterfaceId, Resolve, Type, TypeDefKind, WorldItem};

use super::{CallError, World};

/// WASI 0.2 interfaces the host links (without capabilities). Any 0.2.x version is accepted
/// here; the linker's exact check after compiling catches a signature this list cannot.
const WASI: &[&str] = &[
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:sockets/network",
    "wasi:sockets/instance-network",
    "wasi:sockets/tcp",
    "wasi:sockets/tcp-create-socket",
    "wasi:sockets/udp",
    "wasi:sockets/udp-create-socket",
    "wasi:sockets/ip-name-lookup",
];

/// The host's side of the contract: `wit/platform.wit`, parsed once.
pub struct Contract {
    resolve: Resolve,
    /// Export function of each world, by world name.
    exports: Vec<(World, Function)>,
    /// The `twinhost:platform` interfaces a guest may import, by name with version.
    interfaces: Vec<(String, InterfaceId)>,
}

impl Contract {
    /// Parse the WIT this host was built with.
    pub fn load() -> Result<Contract, String> {
        let mut resolve = Resolve::default();
        let pkg = resolve
            .push_str("platform.wit", include_str!("../../../wit/platform.wit"))
            .map_err(|e| format!("parsing wit/platform.wit: {e:#}"))?;
        let mut exports = Vec::new();
        for world in World::ALL {
            let func = world.export();
            let id = resolve
                .select_world(&[pkg], Some(world.as_str()))
                .map_err(|e| format!("{e:#}"))?;
            let f = resolve.worlds[id]
                .exports
                .values()
                .find_map(|item| match item {
                    WorldItem::Function(f) if f.name == func => Some(f.clone()),
                    _ => None,
                })
                .ok_or_else(|| format!("world {world} of wit/platform.wit exports no {func}"))?;
            exports.push((world, f));
        }
        let interfaces = resolve.packages[pkg]
            .interfaces
            .values()
            .map(|id| (resolve.id_of(*id).unwrap_or_default(), *id))
            .collect();
        Ok(Contract {
            resolve,
            exports,
            interfaces,
        })
    }

    /// The world `bytes` implements, or why it fits none. Reads types only.
    ///
    /// # Errors
    /// [`CallError::Invalid`] naming what does not fit: not a component, no world of this
    /// host, an export with another signature, an import the host does not provide.
    pub fn check(&self, bytes: &[u8]) -> Result<World, CallError> {
        let invalid = |m: String| CallError::Invalid(m);
        let (theirs, world) = match decode(bytes) {
            Ok(DecodedWasm::Component(r, w)) => (r, w),
            Ok(DecodedWasm::WitPackage(..)) => {
                return Err(invalid(
                    "this is a WIT package, not a component with code".into(),
                ))
            }
            Err(e) => return Err(invalid(format!("not a valid component: {e:#}"))),
        };
        let w = &theirs.worlds[world];
        let exported: Vec<&Function> = w
            .exports
            .values()
            .filter_map(|i| match i {
                WorldItem::Function(f) => Some(f),
                _ => None,
            })
            .collect();
        let Some((name, ours, found)) = self.exports.iter().find_map(|(world, f)| {
            exported
                .iter()
                .find(|e| e.name == f.name)
                .map(|e| (*world, f, *e))
        }) else {
            let names: Vec<String> = w.exports.keys().map(|k| theirs.name_world_key(k)).collect();
            return Err(invalid(format!(
                "the component exports [{}], which matches no world this host runs (compute exports `run`, behavior `on-event`, resolver `resolve`)",
                names.join(", ")
            )));
        };
        let (want, got) = (func_shape(&self.resolve, ours), func_shape(&theirs, found));
        if want != got {
            return Err(invalid(format!(
                "the component's `{}` is `{got}`, but world {name} needs `{want}`",
                ours.name
            )));
        }
        for (key, item) in &w.imports {
            let import = theirs.name_world_key(key);
            match item {
                WorldItem::Type { .. } => {}
                WorldItem::Function(f) => {
                    return Err(invalid(format!(
                        "the component imports the function `{}`, which the host does not provide (only twinhost:platform/host@0.1.0 and WASI 0.2 without capabilities)",
                        f.name
                    )))
                }
                WorldItem::Interface { id, .. } => self.check_import(&theirs, &import, *id)?,
            }
        }
        Ok(name)
    }

    fn check_import(
        &self,
        theirs: &Resolve,
        import: &str,
        id: InterfaceId,
    ) -> Result<(), CallError> {
        let (base, version) = import.split_once('@').unwrap_or((import, ""));
        if base.starts_with("wasi:") {
            if WASI.contains(&base) && version.starts_with("0.2.") {
                return Ok(());
            }
            return Err(CallError::Invalid(format!(
                "the component imports {import}; the host provides WASI 0.2 ({}) without capabilities",
                "cli, clocks, filesystem, io, random, sockets"
            )));
        }
        let Some((_, ours)) = self.interfaces.iter().find(|(n, _)| n == import) else {
            return Err(CallError::Invalid(format!(
                "the component imports {import}, which the host does not provide (only twinhost:platform/host@0.1.0 and WASI 0.2 without capabilities)"
            )));
        };
        let ours = &self.resolve.interfaces[*ours];
        for (fname, f) in &theirs.interfaces[id].functions {
            let Some(o) = ours.functions.get(fname) else {
                return Err(CallError::Invalid(format!(
                    "the component imports `{fname}` from {import}, which has no such function"
                )));
            };
            let (want, got) = (func_shape(&self.resolve, o), func_shape(theirs, f));
            if want != got {
                return Err(CallError::Invalid(format!(
                    "the component imports `{fname}` from {import} as `{got}`, but the host provides `{want}`"
                )));
            }
        }
        Ok(())
    }
}

/// A function's type as text: parameter types and result, structurally (type names do not
/// matter in the component model; field and case names do).
fn func_shape(r: &Resolve, f: &Function) -> String {
    let params: Vec<String> = f.params.iter().map(|p| shape(r, &p.ty)).collect();
    match &f.result {
        Some(t) => format!("func({}) -> {}", params.join(", "), shape(r, t)),
        None => format!("func({})", params.join(", ")),
    }
}

fn shape(r: &Resolve, t: &Type) -> String {
    let id = match t {
        Type::Id(id) => *id,
        Type::Bool => return "bool".into(),
        Type::U8 => return "u8".into(),
        Type::U16 => return "u16".into(),
        Type::U32 => return "u32".into(),
        Type::U64 => return "u64".into(),
        Type::S8 => return "s8".into(),
        Type::S16 => return "s16".into(),
        Type::S32 => return "s32".into(),
        Type::S64 => return "s64".into(),
        Type::F32 => return "f32".into(),
        Type::F64 => return "f64".into(),
        Type::Char => return "char".into(),
        Type::String => return "string".into(),
        Type::ErrorContext => return "error-context".into(),
    };
    let opt = |t: &Option<Type>| t.as_ref().map_or("_".to_owned(), |t| shape(r, t));
    match &r.types[id].kind {
        TypeDefKind::Type(t) => shape(r, t),
        TypeDefKind::Record(rec) => {
            let f: Vec<String> = rec
                .fields
                .iter()
                .map(|f| format!("{}: {}", f.name, shape(r, &f.ty)))
                .collect();
            format!("record {{{}}}", f.join(", "))
        }
        TypeDefKind::Variant(v) => {
            let c: Vec<String> = v
                .cases
                .iter()
                .map(|c| match &c.ty {
                    Some(t) => format!("{}({})", c.name, shape(r, t)),
                    None => c.name.clone(),
                })
                .collect();
            format!("variant {{{}}}", c.join(", "))
        }
        TypeDefKind::Enum(e) => {
            let c: Vec<&str> = e.cases.iter().map(|c| c.name.as_str()).collect();
            format!("enum {{{}}}", c.join(", "))
        }
        TypeDefKind::Flags(fl) => {
            let c: Vec<&str> = fl.flags.iter().map(|c| c.name.as_str()).collect();
            format!("flags {{{}}}", c.join(", "))
        }
        TypeDefKind::Tuple(tu) => {
            let c: Vec<String> = tu.types.iter().map(|t| shape(r, t)).collect();
            format!("tuple<{}>", c.join(", "))
        }
        TypeDefKind::Option(t) => format!("option<{}>", shape(r, t)),
        TypeDefKind::Result(res) => format!("result<{}, {}>", opt(&res.ok), opt(&res.err)),
        TypeDefKind::List(t) => format!("list<{}>", shape(r, t)),
        // Nothing in the contract uses these; a guest that does cannot match it.
        other => format!("<{}>", other.as_str()),
    }
}
