//! The OpenAPI document as served: utoipa's output from the handlers and the core types, then
//! the constraints a derive cannot state, so that a request built from the document is one
//! the server accepts.
//!
//! The derives stay on the types serde parses (document and parser cannot drift apart); what
//! is corrected here is what `#[schema]` attributes cannot say: which field combinations the
//! server takes (`oneOf` of whole shapes), a serde-tagged enum as `oneOf` + `discriminator`,
//! names checked by [`check_name`](crate::registry::check_name), limits that are constants
//! elsewhere, and a binary upload body. Each correction names the server check it states.
//! The tests in `api/openapi_tests.rs` build requests from this document and send them.

use serde_json::{json, Map, Value};

use crate::events::EventType;
use crate::registry::query::{MAX_CONDITIONS, MAX_LIMIT};
use crate::registry::{MAX_PROPERTIES, NAME_PATTERN};

/// What `humantime::parse_duration` takes: numbers with units (`30s`, `5m`, `1h 30m`).
const DURATION_PATTERN: &str = r"^\s*([0-9]+\s*[a-zA-Z]+\s*)+$";
/// `If-Match`: a twin version, quoted or not, weak or not, or `*`.
const IF_MATCH_PATTERN: &str = r#"^\s*(\*|(W/)?"?[0-9]{1,19}"?)\s*$"#;
/// Comma-separated UUIDs (`?twin_id=` of the event routes).
const UUID_LIST_PATTERN: &str = r"^\s*[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}\s*(,\s*[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}\s*)*$";

/// The document with every correction applied.
pub fn document() -> Value {
    let mut doc = serde_json::to_value(<super::ApiDoc as utoipa::OpenApi>::openapi())
        .expect("the document serializes");
    correct(&mut doc);
    doc
}

fn correct(doc: &mut Value) {
    names_in_paths(doc);
    if_match(doc);
    event_params(doc);
    module_upload(doc);
    merge_patch_bodies(doc);
    new_twin(doc);
    ingest(doc);
    where_condition(doc);
    binding(doc);
    invoke_body(doc);
    model(doc);
    rules(doc);
    event(doc);
}

fn schemas(doc: &mut Value) -> &mut Map<String, Value> {
    doc["components"]["schemas"]
        .as_object_mut()
        .expect("the document has component schemas")
}

fn schema<'a>(doc: &'a mut Value, name: &str) -> &'a mut Value {
    schemas(doc)
        .get_mut(name)
        .unwrap_or_else(|| panic!("component schema {name} is missing"))
}

fn operation<'a>(doc: &'a mut Value, path: &str, method: &str) -> &'a mut Value {
    let op = &mut doc["paths"][path][method];
    assert!(op.is_object(), "{method} {path} is not in the document");
    op
}

fn params(op: &mut Value) -> impl Iterator<Item = &mut Value> {
    op.get_mut("parameters")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
}

fn name_schema(example: &str) -> Value {
    json!({"type": "string", "pattern": NAME_PATTERN, "example": example})
}

fn duration_schema(what: &str) -> Value {
    json!({"type": "string", "pattern": DURATION_PATTERN, "example": "30s",
           "description": format!("{what}: a duration like `30s`, `5m`, `1h`; more than zero and at most 7 days.")})
}

/// `{"$ref": …}` to a component.
fn r(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// Path parameters that are names the server checks with `check_name` (module, behavior,
/// rule and relationship names, entity types).
fn names_in_paths(doc: &mut Value) {
    let paths = doc["paths"].as_object_mut().expect("paths");
    for item in paths.values_mut() {
        for op in item
            .as_object_mut()
            .into_iter()
            .flat_map(|m| m.values_mut())
        {
            for p in params(op) {
                let example = match p["name"].as_str() {
                    Some("entity_type") => "machine",
                    Some("name") => "example",
                    _ => continue,
                };
                if p["in"] == "path" {
                    p["schema"] = name_schema(example);
                }
            }
        }
    }
}

fn if_match(doc: &mut Value) {
    let op = operation(doc, "/v1/twins/{id}", "patch");
    for p in params(op) {
        if p["name"] == "If-Match" {
            p["schema"] =
                json!({"type": "string", "pattern": IF_MATCH_PATTERN, "example": "\"1\""});
        }
    }
}

fn event_params(doc: &mut Value) {
    let types = EventType::ALL
        .map(|t| t.as_str().replace('.', r"\."))
        .join("|");
    let types = format!(r"^\s*({types})\s*(,\s*({types})\s*)*$");
    for path in ["/v1/events", "/v1/events/ws", "/v1/events/log"] {
        let op = operation(doc, path, "get");
        for p in params(op) {
            match p["name"].as_str() {
                Some("twin_id") => {
                    p["schema"] = json!({"type": "string", "pattern": UUID_LIST_PATTERN,
                                         "example": "0193e0a0-0000-7000-8000-000000000000"})
                }
                Some("types") => {
                    p["schema"] =
                        json!({"type": "string", "pattern": types, "example": "twin.updated"})
                }
                Some("limit") => {
                    p["schema"] = json!({"type": "integer", "minimum": 1,
                                         "maximum": super::super::events::MAX_LOG_PAGE})
                }
                _ => {}
            }
        }
    }
}

/// The body of `PUT /v1/modules/{name}` is the component's bytes.
fn module_upload(doc: &mut Value) {
    let op = operation(doc, "/v1/modules/{name}", "put");
    let bytes = json!({"schema": {"type": "string", "format": "binary",
                                  "contentMediaType": "application/wasm"}});
    op["requestBody"] = json!({
        "description": format!("The component's bytes (a WebAssembly component of the behavior, \
            compute or resolver world), at most {} bytes.", crate::wasm::MAX_MODULE_BYTES),
        "required": true,
        "content": {"application/wasm": bytes, "application/octet-stream": bytes},
    });
}

/// PATCH of a twin and the relationship PUT take an object of at most `MAX_PROPERTIES`
/// properties (`check_patch`).
fn merge_patch_bodies(doc: &mut Value) {
    let op = operation(doc, "/v1/twins/{id}", "patch");
    let s = &mut op["requestBody"]["content"]["application/json"]["schema"];
    s["maxProperties"] = json!(MAX_PROPERTIES);
    let op = operation(
        doc,
        "/v1/twins/{id}/relationships/{name}/{target_id}",
        "put",
    );
    let s = &mut op["requestBody"]["content"]["application/json"]["schema"];
    s["maxProperties"] = json!(MAX_PROPERTIES);
}

/// `POST /v1/ingest` and `POST /v1/twins/bulk` refuse a body without items; a bulk body
/// holds at most `--max-bulk-items` (by default
/// [`DEFAULT_MAX_BULK_ITEMS`](crate::api::DEFAULT_MAX_BULK_ITEMS)). Both take
/// NDJSON as well.
fn ingest(doc: &mut Value) {
    for path in ["/v1/ingest", "/v1/twins/bulk"] {
        let op = operation(doc, path, "post");
        let content = &mut op["requestBody"]["content"];
        let array = &mut content["application/json"]["schema"];
        array["minItems"] = json!(1);
        let item = array["items"].clone();
        // Each line of an NDJSON body is one item (blank lines are skipped).
        content["application/x-ndjson"] = json!({ "schema": item });
    }
    let op = operation(doc, "/v1/twins/bulk", "post");
    op["requestBody"]["content"]["application/json"]["schema"]["maxItems"] =
        json!(crate::api::DEFAULT_MAX_BULK_ITEMS);
}

fn new_twin(doc: &mut Value) {
    schema(doc, "NewTwin")["properties"]["properties"]["maxProperties"] = json!(MAX_PROPERTIES);
}

/// A `where` condition: `in` takes an array, `exists` a boolean or nothing, the comparisons
/// any value (`Query::check`).
fn where_condition(doc: &mut Value) {
    let shape = |ops: Value, value: Value, required: &[&str]| {
        json!({"type": "object", "additionalProperties": false, "required": required,
               "properties": {"property": {"type": "string"}, "op": ops, "value": value}})
    };
    let any_value = json!({"description": "Compared value: any JSON."});
    *schema(doc, "WhereCondition") = json!({
        "description": "One condition on a top-level property.",
        "oneOf": [
            shape(json!({"type": "string", "enum": ["=", "!=", "<", "<=", ">", ">="]}), any_value,
                  &["property", "op"]),
            shape(json!({"const": "in"}), json!({"type": "array"}), &["property", "op", "value"]),
            shape(json!({"const": "exists"}),
                  json!({"type": ["boolean", "null"], "description": "`false` asks for absence."}),
                  &["property", "op"]),
        ],
    });
    let q = &mut schema(doc, "Query")["properties"];
    q["where"]["maxItems"] = json!(MAX_CONDITIONS);
    q["limit"]["maximum"] = json!(MAX_LIMIT);
}

/// A behavior names exactly one of `entity_type` and `twin_id` (`Behaviors::put`). The
/// response (`BehaviorInfo`, which flattens the binding) lists the binding's fields itself:
/// an `allOf` with a closed schema would admit no value.
fn binding(doc: &mut Value) {
    let b = schema(doc, "Binding").clone();
    let props = b["properties"].as_object().expect("Binding has properties");
    let only = |keep: &str, drop: &str| {
        let mut p = props.clone();
        p.remove(drop);
        p[keep] = match keep {
            "twin_id" => json!({"allOf": [r("TwinId")], "description": "An existing twin."}),
            _ => name_schema("machine"),
        };
        json!({"type": "object", "additionalProperties": false, "required": ["module", keep],
               "properties": p})
    };
    *schema(doc, "Binding") = json!({
        "description": b["description"],
        "oneOf": [only("entity_type", "twin_id"), only("twin_id", "entity_type")],
    });
    let info = schema(doc, "BehaviorInfo");
    let extra = info["allOf"][1].clone();
    let mut all = props.clone();
    all.extend(extra["properties"].as_object().cloned().unwrap_or_default());
    let mut required = vec![json!("module")];
    required.extend(extra["required"].as_array().cloned().unwrap_or_default());
    *info = json!({"type": "object", "description": info["description"], "required": required,
                   "properties": all});
}

/// `POST /v1/modules/{name}/invoke`: exactly one of `twin_ids` and `query` for a compute
/// module, or `resolve` alone for a resolver module.
fn invoke_body(doc: &mut Value) {
    let b = schema(doc, "InvokeBody").clone();
    let props = &b["properties"];
    let params = props["parameters"].clone();
    let twin_ids = json!({"type": "array", "items": r("TwinId"),
        "maxItems": super::super::modules::MAX_INVOKE_TWINS,
        "description": "Twins to compute over (each must exist), one call each."});
    *schema(doc, "InvokeBody") = json!({
        "oneOf": [
            {"type": "object", "additionalProperties": false, "required": ["twin_ids"],
             "properties": {"twin_ids": twin_ids, "parameters": params}},
            {"type": "object", "additionalProperties": false, "required": ["query"],
             "properties": {"query": r("Query"), "parameters": params}},
            {"type": "object", "additionalProperties": false, "required": ["resolve"],
             "properties": {"resolve": r("ResolveBody")}},
        ],
    });
}

/// A model's property spec: `min`/`max` only for numbers and integers, `indexed` not for
/// objects and arrays, `enum` values of the property's type (`Model::check`); `merge` needs a
/// resolver.
fn model(doc: &mut Value) {
    let spec = schema(doc, "PropertySpec").clone();
    let base = spec["properties"]
        .as_object()
        .expect("PropertySpec properties");
    let shape = |ty: &str, item: Value, numeric: bool| {
        let mut p = base.clone();
        p["type"] = json!({"const": ty});
        p["enum"] = json!({"type": "array", "minItems": 1, "items": item,
                           "description": "The allowed values."});
        if !numeric {
            p.remove("min");
            p.remove("max");
        }
        if matches!(ty, "object" | "array") {
            p.remove("indexed");
        }
        json!({"type": "object", "additionalProperties": false, "required": ["type"],
               "properties": p})
    };
    *schema(doc, "PropertySpec") = json!({
        "description": format!("{} `min` ≤ `max`; they apply to numbers and integers only.",
                               spec["description"].as_str().unwrap_or_default()),
        "oneOf": [
            shape("number", json!({"type": "number"}), true),
            shape("integer", json!({"type": "integer"}), true),
            shape("boolean", json!({"type": "boolean"}), false),
            shape("string", json!({"type": "string"}), false),
            shape("object", json!({"type": "object"}), false),
            shape("array", json!({"type": "array"}), false),
        ],
    });
    let resolver = name_schema("max-resolver");
    *schema(doc, "ConflictPolicy") = json!({
        "oneOf": [
            {"type": "object", "additionalProperties": false, "required": ["strategy"],
             "properties": {"strategy": {"type": "string", "enum": ["lww", "version", "manual"]}}},
            {"type": "object", "additionalProperties": false, "required": ["strategy", "resolver", "sha256"],
             "properties": {"strategy": {"const": "merge"},
                            "resolver": {"allOf": [resolver], "description": "A `resolver` module."},
                            "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$",
                                       "example": "9f2c4e1a7b3d5f60182a4c6e8b0d2f4a6c8e0b2d4f6a8c0e2b4d6f8a0c2e4b6d",
                                       "description": "The resolver component's sha256 (`GET /v1/modules/{name}`): nodes whose module has other code do not run it."}}},
        ],
    });
    let m = schema(doc, "Model");
    m["description"] = json!(
        "The schema of one entity type. A name in `required` must be \
        declared in `properties` unless `additional_properties` is true."
    );
    m["properties"]["properties"]["maxProperties"] =
        json!(crate::registry::model::MAX_MODEL_PROPERTIES);
}

/// An event as the streams and `GET /v1/events/log` serve it: the struct's fields plus the
/// CloudEvents 1.0 attributes its envelope adds (`Wire` in `events/event.rs`). `origin` is
/// always written (its serde default is for events persisted before it existed).
fn event(doc: &mut Value) {
    let e = schema(doc, "Event");
    let p = &mut e["properties"];
    p["specversion"] = json!({"const": "1.0"});
    p["id"] = json!({"type": "string", "example": "42",
                     "description": "The sequence number, as a string."});
    p["source"] = json!({"type": "string", "example": "/twinhost/edge-1",
                         "description": "`/twinhost/<node id>`: the node whose log holds the event \
                                         (`origin` says where its change was made)."});
    p["subject"] = json!({"type": "string", "format": "uuid",
                          "description": "The twin's id, when the event is about a twin."});
    p["time"] = json!({"type": "string", "format": "date-time",
                       "description": "The same as `ts`."});
    p["datacontenttype"] = json!({"const": "application/json"});
    let req = e["required"]
        .as_array_mut()
        .expect("an event requires fields");
    for name in [
        "origin",
        "specversion",
        "id",
        "source",
        "time",
        "datacontenttype",
    ] {
        req.push(json!(name));
    }
}

/// Rules: `RuleSpec` is a serde enum tagged by `kind`. utoipa renders each variant as an
/// `allOf` of the variant's closed schema and the tag, which no value satisfies (the closed
/// schema refuses `kind`). Here each variant schema gets `kind` itself and `RuleSpec` becomes
/// a `oneOf` of them with a discriminator; the fields get what `rules::validate` checks.
fn rules(doc: &mut Value) {
    let variants = [
        ("threshold", "ThresholdRule"),
        ("window", "WindowRule"),
        ("sequence", "SequenceRule"),
        ("correlation", "CorrelationRule"),
    ];
    for (kind, name) in variants {
        let s = schema(doc, name);
        s["properties"]["kind"] = json!({"type": "string", "enum": [kind]});
        let req = s["required"]
            .as_array_mut()
            .expect("rule variants require fields");
        req.insert(0, json!("kind"));
        let p = &mut s["properties"];
        if p.get("entity_type").is_some() {
            p["entity_type"] = name_schema("machine");
        }
        if p.get("property").is_some() {
            p["property"] = name_schema("temperature");
        }
        p["actions"]["minItems"] = json!(1);
        p["actions"]["maxItems"] = json!(16);
        if p.get("max_groups").is_some() {
            p["max_groups"] = json!({"type": "integer", "minimum": 1,
                                     "maximum": crate::events::rules::DEFAULT_MAX_GROUPS});
        }
        for d in ["cooldown", "size", "slide", "lateness", "within"] {
            if p.get(d).is_some() {
                p[d] = duration_schema(d);
            }
        }
    }
    schema(doc, "ThresholdRule")["description"] = json!(
        "Fires when `property op value` becomes true for a twin. It fires again only after the \
         value has gone back past `clear` (hysteresis; default: the bound itself; on the other \
         side of `value` from the bound, and not with `==` or `!=`) and `cooldown` has passed \
         since the last firing for that twin."
    );
    let w = schema(doc, "WindowRule");
    w["properties"]["group_by"] = json!({"type": "string", "enum": ["twin", "parent"]});
    w["dependentRequired"] = json!({"op": ["value"], "value": ["op"]});
    w["description"] = json!(
        "Aggregates `property` over event-time windows of `size` (tumbling), or of `size` every \
         `slide` (sliding; `size` a whole multiple of `slide`, at most 1000 windows per \
         `(size + lateness) / slide`). Fires when a window closes and its aggregate satisfies \
         `op value` (both or neither; every window when none is given)."
    );
    let s = schema(doc, "SequenceRule");
    s["properties"]["relationship"] = name_schema("feeds");
    s["oneOf"] = json!([
        {"properties": {"correlate": {"enum": ["twin", "parent"]}},
         "not": {"required": ["relationship"]}},
        {"properties": {"correlate": {"const": "relationship"}},
         "required": ["correlate", "relationship"]},
    ]);
    let c = schema(doc, "CorrelationRule");
    c["properties"]["min_count"] = json!({"type": "integer", "minimum": 2});
    schema(doc, "Condition")["properties"]["property"] = name_schema("temperature");
    *schema(doc, "RuleSpec") = json!({
        "description": "A rule, by `kind`. `entity_type` / `twin_id` narrow the twins it \
            watches (both optional).",
        "oneOf": variants.map(|(_, n)| r(n)),
        "discriminator": {"propertyName": "kind", "mapping": Map::from_iter(
            variants.map(|(k, n)| (k.to_owned(), json!(format!("#/components/schemas/{n}")))))},
    });
    actions(doc);
}

/// A rule's actions, tagged by `type`: a discriminated `oneOf` of closed schemas. The
/// `workflow` action is left out: this node refuses it (`rules::validate`).
fn actions(doc: &mut Value) {
    let a = schema(doc, "Action").clone();
    let mut mapping = Map::new();
    let mut refs = Vec::new();
    for branch in a["oneOf"].as_array().expect("Action is a oneOf") {
        let ty = branch["properties"]["type"]["enum"][0]
            .as_str()
            .expect("each action names its type")
            .to_owned();
        if ty == "workflow" {
            continue;
        }
        let name = format!("{}{}Action", ty[..1].to_uppercase(), &ty[1..]);
        let mut b = branch.clone();
        b["additionalProperties"] = json!(false);
        let p = &mut b["properties"];
        match ty.as_str() {
            "alert" => {
                p["severity"] = json!({"type": "string", "enum": ["warning", "info", "critical"],
                                       "default": "warning"})
            }
            "patch" => {
                p["properties"]["minProperties"] = json!(1);
                p["properties"]["maxProperties"] = json!(MAX_PROPERTIES);
            }
            "invoke" => {
                p["module"] = json!({"type": "string", "pattern": NAME_PATTERN,
                    "example": "thermal-analysis", "description": "An uploaded compute module."})
            }
            _ => {}
        }
        mapping.insert(ty, json!(format!("#/components/schemas/{name}")));
        refs.push(r(&name));
        schemas(doc).insert(name, b);
    }
    *schema(doc, "Action") = json!({
        "description": a["description"],
        "oneOf": refs,
        "discriminator": {"propertyName": "type", "mapping": mapping},
    });
}
