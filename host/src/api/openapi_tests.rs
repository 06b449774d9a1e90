//! The served OpenAPI document: valid OpenAPI 3.1, and true to what the server accepts.
//!
//! The second test is a small generator: for every operation that takes a JSON body or query
//! parameters it builds requests from the operation's schemas alone (required fields only,
//! then every field; each branch of each `oneOf`), checks them against those schemas, and
//! sends them through the router in-process. None may be refused as invalid.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Map, Value};
use tower::ServiceExt;
use uuid::Uuid;

use super::ops::document;
use crate::registry::NAME_PATTERN;

/// The official JSON Schema of OpenAPI 3.1 documents (2022-10-07), as shipped by
/// openapi-spec-validator.
const OAS_31_SCHEMA: &str = include_str!("../../../tests/fixtures/openapi-3.1-schema.json");

/// Guest components of the repository's build step (`scripts/build-guests.sh`), uploaded
/// under the names the document uses as examples.
const MODULES: [(&str, &str); 3] = [
    ("thermal-monitor", "thermal_monitor"),
    ("thermal-analysis", "thermal_analysis"),
    ("max-resolver", "max_resolver"),
];

fn guest(file: &str) -> Vec<u8> {
    let path = format!(
        "{}/../guests/target/wasm32-wasip2/release/{file}.wasm",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!("{path}: {e}; build the guests first with scripts/build-guests.sh")
    })
}

#[test]
fn document_is_valid_openapi_31() {
    let doc = document();
    if let Ok(path) = std::env::var("TWINHOST_WRITE_OPENAPI") {
        // For external validators: `python3 -m openapi_spec_validator $path`.
        std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    }
    let oas: Value = serde_json::from_str(OAS_31_SCHEMA).expect("vendored schema parses");
    let v = jsonschema::validator_for(&oas).expect("the OpenAPI schema compiles");
    let errors: Vec<String> = v
        .iter_errors(&doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "not valid OpenAPI 3.1:\n{}",
        errors.join("\n")
    );
    // That schema checks schema objects only for being objects: each one must also be a
    // valid JSON Schema 2020-12 (OpenAPI 3.1's dialect).
    for (name, s) in doc["components"]["schemas"].as_object().unwrap() {
        let mut s = s.clone();
        s["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
        if let Err(e) = jsonschema::meta::validate(&s) {
            panic!("components.schemas.{name}: {e}");
        }
    }
    // Names the server checks with `check_name` are documented with its rule.
    let mut patterns = BTreeSet::new();
    collect_patterns(&doc, &mut patterns);
    for p in patterns.iter().filter(|p| p.contains("A-Za-z0-9_")) {
        assert_eq!(p, NAME_PATTERN);
    }
}

/// A query's page is documented by the fields its JSON has (it serializes by hand: the
/// struct's own fields are not those).
#[test]
fn a_query_page_is_documented_by_its_json_fields() {
    let doc = document();
    let keys = |v: &Value| -> BTreeSet<String> { v.as_object().unwrap().keys().cloned().collect() };
    let page = serde_json::to_value(crate::registry::query::Page::default()).unwrap();
    assert_eq!(
        keys(&doc["components"]["schemas"]["Page"]["properties"]),
        keys(&page)
    );
}

fn collect_patterns(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(p)) = m.get("pattern") {
                out.insert(p.clone());
            }
            m.values().for_each(|x| collect_patterns(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| collect_patterns(x, out)),
        _ => {}
    }
}

/// Builds a value that satisfies a schema of the document.
struct Gen<'a> {
    doc: &'a Value,
    /// An existing twin: every UUID but a new twin's own `id` names it.
    twin: Uuid,
    /// Every property (else only the required ones).
    full: bool,
    /// Which branch each `oneOf` takes (modulo its length).
    branch: usize,
}

impl Gen<'_> {
    fn resolve<'s>(&'s self, s: &'s Value) -> &'s Value {
        match s.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let name = r.strip_prefix("#/components/schemas/").expect("local ref");
                self.resolve(&self.doc["components"]["schemas"][name])
            }
            None => s,
        }
    }

    fn value(&self, s: &Value, name: &str) -> Value {
        let s = self.resolve(s);
        for k in ["const", "example", "default"] {
            if let Some(v) = s.get(k) {
                return v.clone();
            }
        }
        if let Some(e) = s.get("enum") {
            return e[0].clone();
        }
        if let Some(all) = s.get("allOf").and_then(Value::as_array) {
            assert_eq!(all.len(), 1, "{name}: allOf of several schemas: {s}");
            return self.value(&all[0], name);
        }
        let is_object = s.get("properties").is_some() || s["type"] == "object";
        if let (Some(one), false) = (s.get("oneOf").and_then(Value::as_array), is_object) {
            return self.value(&one[self.branch % one.len()], name);
        }
        let ty = match &s["type"] {
            Value::String(t) => t.as_str(),
            // `["string", "null"]`: an optional field; generated only when all are.
            Value::Array(ts) => ts
                .iter()
                .filter_map(Value::as_str)
                .find(|t| *t != "null")
                .unwrap(),
            _ => return json!(70),
        };
        match ty {
            "string" => {
                assert!(
                    s.get("pattern").is_none(),
                    "{name}: a pattern without an example"
                );
                match s["format"].as_str() {
                    Some("uuid") if name == "id" => json!(Uuid::new_v4()),
                    Some("uuid") => json!(self.twin),
                    Some("date-time") => json!(chrono::Utc::now().to_rfc3339()),
                    // Cursors come from the server: a first page has none.
                    _ if name == "cursor" && s["type"].is_array() => Value::Null,
                    _ => json!("x".repeat(s["minLength"].as_u64().unwrap_or(1) as usize)),
                }
            }
            "integer" | "number" => s.get("minimum").cloned().unwrap_or(json!(0)),
            "boolean" => json!(self.full),
            "array" => {
                let n = s["minItems"].as_u64().unwrap_or(0).max(self.full as u64);
                (0..n).map(|_| self.value(&s["items"], name)).collect()
            }
            "null" => Value::Null,
            _ => self.object(s, name),
        }
    }

    fn object(&self, s: &Value, name: &str) -> Value {
        // A `oneOf` beside `properties` narrows the object: its branch's properties replace
        // the object's, its `required` adds, its `not: {required}` removes.
        let mut props = s["properties"].as_object().cloned().unwrap_or_default();
        let mut required: BTreeSet<String> = strings(&s["required"]);
        let mut excluded = BTreeSet::new();
        if let Some(one) = s.get("oneOf").and_then(Value::as_array) {
            let b = &one[self.branch % one.len()];
            for (k, v) in b["properties"].as_object().into_iter().flatten() {
                props.insert(k.clone(), v.clone());
            }
            required.extend(strings(&b["required"]));
            excluded = strings(&b["not"]["required"]);
        }
        let mut out = Map::new();
        for (k, v) in &props {
            if excluded.contains(k) || !(self.full || required.contains(k)) {
                continue;
            }
            out.insert(k.clone(), self.value(v, k));
        }
        let open = s.get("additionalProperties").is_none_or(|a| a != false);
        if props.is_empty() && open && (self.full || s["minProperties"].as_u64() > Some(0)) {
            let v = match s.get("additionalProperties") {
                Some(a) if a.is_object() => self.value(a, name),
                _ => json!(70),
            };
            out.insert("temperature".into(), v);
        }
        Value::Object(out)
    }
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_owned))
        .collect()
}

/// Check a value (generated from the schema, or one the server wrote) against the schema
/// (formats included).
fn check(doc: &Value, schema: &Value, v: &Value, what: &str) {
    let wrapped = json!({"$schema": "https://json-schema.org/draft/2020-12/schema",
                         "components": doc["components"], "allOf": [schema]});
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&wrapped)
        .unwrap_or_else(|e| panic!("{what}: schema does not compile: {e}"));
    let errors: Vec<String> = validator.iter_errors(v).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "{what}: the document refuses {v}: {errors:?}"
    );
}

/// Percent-encode a query-string value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct Node {
    _dir: tempfile::TempDir,
    state: super::AppState,
    router: axum::Router,
}

async fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let n = crate::cli::serve::open_default_node(dir.path(), "node-test", true)
        .await
        .unwrap();
    let router = super::router(n.state.clone(), Default::default());
    Node {
        _dir: dir,
        state: n.state,
        router,
    }
}

impl Node {
    async fn send(&self, req: Request<Body>) -> (StatusCode, Value) {
        let r = self.router.clone().oneshot(req).await.unwrap();
        let status = r.status();
        if r.headers()
            .get("content-type")
            .is_some_and(|c| c.as_bytes().starts_with(b"text/event-stream"))
        {
            return (status, Value::Null); // an endless stream: the status says enough
        }
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

/// One request an operation's schemas describe.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Call {
    method: String,
    uri: String,
    headers: Vec<(String, String)>,
    body: Option<String>,
}

/// One request of operation `method path`, its parameters generated by `g`.
fn call_for(
    g: &Gen,
    method: &str,
    path: &str,
    params: &[Value],
    body: Option<Value>,
    other: Uuid,
) -> Call {
    let (doc, twin, full) = (g.doc, g.twin, g.full);
    let mut uri = path.to_owned();
    let (mut query, mut headers) = (Vec::new(), Vec::new());
    for p in params {
        let pname = p["name"].as_str().unwrap();
        let required = p["required"] == true;
        let v = match (p["in"].as_str().unwrap(), pname) {
            // Deletes go to what does not exist (404): the rest need it.
            ("path", "id") if method == "delete" => json!(Uuid::new_v4()),
            ("path", "id") => json!(twin),
            ("path", "target_id") => json!(other),
            ("path", "name") if method == "delete" => json!("gone"),
            ("path", "name") if path.starts_with("/v1/modules/") => {
                let resolve = body.as_ref().is_some_and(|b| b.get("resolve").is_some());
                json!(if resolve {
                    "max-resolver"
                } else {
                    "thermal-analysis"
                })
            }
            ("path", "entity_type") => json!("sample-model"),
            ("path", "property") => json!("temperature"),
            (_, "access_token") => continue,
            _ if !(required || full) => continue,
            _ => p
                .get("example")
                .cloned()
                .unwrap_or_else(|| g.value(&p["schema"], pname)),
        };
        check(doc, &p["schema"], &v, &format!("{method} {path} {pname}"));
        let text = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
        match p["in"].as_str().unwrap() {
            "path" => uri = uri.replace(&format!("{{{pname}}}"), &enc(&text)),
            "query" => query.push(format!("{pname}={}", enc(&text))),
            _ => headers.push((pname.to_owned(), text)),
        }
    }
    if !query.is_empty() {
        uri = format!("{uri}?{}", query.join("&"));
    }
    Call {
        method: method.to_uppercase(),
        uri,
        headers,
        body: body.map(|b| b.to_string()),
    }
}

/// Requests built from the document: for each operation with a body or query parameters,
/// the required fields only and all of them, and every `oneOf` branch.
fn calls_from(doc: &Value, twin: Uuid, other: Uuid) -> BTreeSet<Call> {
    let mut calls = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        // A WebSocket upgrade, not a request the router answers without a connection.
        if path == "/v1/events/ws" {
            continue;
        }
        for (method, op) in item.as_object().unwrap() {
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            let body = &op["requestBody"]["content"]["application/json"]["schema"];
            let binary = op["requestBody"]["content"]
                .get("application/wasm")
                .is_some();
            let has_query = params.iter().any(|p| p["in"] == "query");
            if body.is_null() && !has_query && !binary {
                continue;
            }
            for full in [false, true] {
                for branch in 0..6 {
                    let g = Gen {
                        doc,
                        twin,
                        full,
                        branch,
                    };
                    let body = (!body.is_null()).then(|| {
                        let v = g.value(body, "body");
                        check(doc, body, &v, &format!("{method} {path}"));
                        v
                    });
                    calls.insert(call_for(&g, method, path, &params, body, other));
                }
            }
        }
    }
    calls
}

/// Send every call through the router; what was refused, described.
async fn refused(n: &Node, calls: &BTreeSet<Call>) -> Vec<String> {
    let mut refused = Vec::new();
    let analysis = guest("thermal_analysis");
    for c in calls {
        let mut req = Request::builder()
            .method(Method::from_bytes(c.method.as_bytes()).unwrap())
            .uri(&c.uri);
        for (k, v) in &c.headers {
            req = req.header(k, v);
        }
        let req = match (
            &c.body,
            c.method == "PUT" && c.uri.starts_with("/v1/modules/"),
        ) {
            (_, true) => req
                .header("content-type", "application/wasm")
                .body(Body::from(analysis.clone())),
            (Some(b), _) => req
                .header("content-type", "application/json")
                .body(Body::from(b.clone())),
            (None, _) => req.body(Body::empty()),
        };
        let (status, answer) = n.send(req.unwrap()).await;
        let unrouted = status == StatusCode::NOT_FOUND
            && answer["error"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("no route"));
        let rejected_items = answer["rejected"].as_array().is_some_and(|r| !r.is_empty());
        if matches!(status.as_u16(), 400 | 405 | 415 | 422 | 500..) || unrouted || rejected_items {
            refused.push(format!(
                "{} {} {:?} {}\n  → {status} {answer}",
                c.method,
                c.uri,
                c.headers,
                c.body.as_deref().unwrap_or("")
            ));
        }
    }
    refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_built_from_the_document_are_accepted() {
    let n = node().await;
    let mut doc = document();
    let machine = || crate::registry::NewTwin {
        entity_type: "machine".into(),
        ..Default::default()
    };
    let twin = n.state.registry.create(machine()).await.unwrap().id.0;
    let other = n.state.registry.create(machine()).await.unwrap().id.0;
    for (name, file) in MODULES {
        n.state
            .runtime
            .upload(name, guest(file), Default::default(), false)
            .await
            .unwrap();
    }
    // A `merge` model must pin the resolver's real sha256.
    let info = n.state.runtime.info("max-resolver").unwrap();
    doc["components"]["schemas"]["ConflictPolicy"]["oneOf"][1]["properties"]["sha256"]["example"] =
        json!(info.versions[0].sha256);
    let calls = calls_from(&doc, twin, other);
    let refused = refused(&n, &calls).await;
    assert!(
        refused.is_empty(),
        "{} of {} requests built from the document were refused:\n{}",
        refused.len(),
        calls.len(),
        refused.join("\n")
    );
}

/// Events as the server writes them match the document's `Event`, each with its `origin` —
/// this node's for a change made here, the peer's for one merged from it — and the log's
/// answer its `EventPage`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_events_match_the_document() {
    let n = node().await;
    let doc = document();
    let registry = &n.state.registry;
    registry
        .create(crate::registry::NewTwin {
            entity_type: "machine".into(),
            properties: json!({"temperature": 70}).as_object().unwrap().clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let hlc = crate::types::hlc_at(chrono::Utc::now());
    let merged: crate::registry::RemoteChange = serde_json::from_value(json!({
        "twin_id": Uuid::now_v7(), "entity_type": "machine", "vclock": {"edge-2": 1},
        "hlc": hlc, "properties": {"temperature": 71},
        "clocks": {"temperature": {"hlc": hlc, "origin": "edge-2"}}}))
    .unwrap();
    registry.apply_remote(vec![merged]).await.unwrap();
    let req = Request::get("/v1/events/log").body(Body::empty()).unwrap();
    let (status, page) = n.send(req).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    check(
        &doc,
        &json!({"$ref": "#/components/schemas/EventPage"}),
        &page,
        "GET /v1/events/log",
    );
    let origins: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["origin"].as_str().unwrap())
        .collect();
    assert_eq!(origins, ["node-test", "edge-2"]);
    n.state.registry.shutdown();
}
