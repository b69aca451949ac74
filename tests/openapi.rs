//! `docs/admin-api.yaml` against the management API it describes.
//!
//! The document is parsed and its schemas compiled with `jsonschema` (JSON
//! Schema 2020-12, the dialect of OpenAPI 3.1, with format checks on); every
//! schema is addressed by its JSON pointer inside the document, so `$ref`s
//! resolve exactly as an OpenAPI tool resolves them. Then a real gateway
//! (the harness in `common`) is asked, and every answer it gives here is
//! checked against the document: its status must be documented for the
//! operation, its body must validate against that response's schema, and
//! its documented headers must be there.
//!
//! - the document's routes and scopes are the router's own
//!   ([`keyrouter::admin::routes`]), in both directions, and every documented
//!   route answers on the server under its template with the documented
//!   scope;
//! - every example validates, every request example is accepted by the
//!   server with the documented success status, and every object in every
//!   example is closed (`additionalProperties: false`);
//! - real answers of every operation, every error status and every audit
//!   event kind validate;
//! - the schemas accept exactly what the server accepts at the edges of
//!   every documented rule (lengths, ranges, patterns, enums).
//!
//! Requests are spread over loopback addresses (see [`send`]) so that the
//! per-address rate limit only shows where a test asks for it.

mod common;

use common::{AdminRequest, Auth, Reply, TestGateway, token};
use jsonschema::{Resource, Validator};
use keyrouter::audit::EventKind;
use keyrouter::keys::{KeyState, KeyStatus};
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

const DOC_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/admin-api.yaml");
/// The base URI the document is registered under for `$ref` resolution.
const DOC_URI: &str = "urn:keyrouter:admin-api";
const PREFIX: &str = "/admin/v1";
/// The operation keys of an OpenAPI path item.
const OPERATION_METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];
const SCOPES: [&str; 3] = ["keys:read", "keys:write", "audit:read"];
/// A well-formed id that names no key.
const PLACEHOLDER_ID: &str = "key_0000000000000000";
/// Added to examples to prove their objects are closed.
const UNKNOWN_FIELD: &str = "x_unknown_field";
/// The contract's error types (section 4).
const ERROR_TYPES: [&str; 11] = [
    "invalid_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "conflict",
    "payload_too_large",
    "rate_limit_exceeded",
    "no_available_key",
    "upstream_error",
    "upstream_timeout",
    "internal_error",
];

// === The document ===

/// The parsed document.
struct Doc {
    root: Value,
}

/// Parsed once per test binary.
fn doc() -> &'static Doc {
    static DOC: OnceLock<Doc> = OnceLock::new();
    DOC.get_or_init(|| {
        let text = std::fs::read_to_string(DOC_FILE).unwrap();
        let root: Value =
            serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{DOC_FILE}: {e}"));
        Doc { root }
    })
}

/// One JSON pointer segment.
fn esc(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// A JSON pointer as a URI fragment.
fn fragment(pointer: &str) -> String {
    let mut out = String::new();
    for b in pointer.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/!$&'()*+,;=:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-decoding as the server does it: `%XX` only, `+` stays.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// One documented operation.
#[derive(Clone, Debug)]
struct Operation {
    id: String,
    method: Method,
    /// The path template, e.g. `/admin/v1/keys/{id}`.
    path: String,
    /// JSON pointer of the operation object.
    pointer: String,
    /// `x-required-scope`.
    scope: String,
}

impl Operation {
    /// The path for the harness (relative to `/admin/v1`) with `id` filled in.
    fn url(&self, id: &str) -> String {
        self.path.strip_prefix(PREFIX).unwrap().replace("{id}", id)
    }

    fn has_id(&self) -> bool {
        self.path.contains("{id}")
    }
}

impl Doc {
    fn at(&self, pointer: &str) -> &Value {
        self.root
            .pointer(pointer)
            .unwrap_or_else(|| panic!("the document has nothing at {pointer}"))
    }

    /// The pointer of the object at `pointer`, following `$ref`s (of
    /// parameters, responses, headers).
    fn follow(&self, pointer: &str) -> String {
        let mut p = pointer.to_owned();
        for _ in 0..8 {
            match self.at(&p).get("$ref").and_then(Value::as_str) {
                Some(r) => {
                    p = r
                        .strip_prefix('#')
                        .unwrap_or_else(|| panic!("{pointer}: $ref {r} leaves the document"))
                        .to_owned();
                }
                None => return p,
            }
        }
        panic!("{pointer}: $ref loop");
    }

    /// A validator for the schema at `pointer` inside the document.
    fn validator(&self, pointer: &str) -> Validator {
        let resource = Resource::from_contents(self.root.clone()).unwrap();
        jsonschema::options()
            .should_validate_formats(true)
            .with_resource(DOC_URI, resource)
            .build(&json!({"$ref": format!("{DOC_URI}#{}", fragment(pointer))}))
            .unwrap_or_else(|e| panic!("the schema at {pointer} does not compile: {e}"))
    }

    /// Why `instance` does not validate against the schema at `pointer`.
    fn errors(&self, pointer: &str, instance: &Value) -> Vec<String> {
        self.validator(pointer)
            .iter_errors(instance)
            .map(|e| format!("{e} (at {})", e.instance_path))
            .collect()
    }

    fn is_valid(&self, pointer: &str, instance: &Value) -> bool {
        self.validator(pointer).is_valid(instance)
    }

    fn assert_valid(&self, pointer: &str, instance: &Value, what: &str) {
        let errors = self.errors(pointer, instance);
        assert!(
            errors.is_empty(),
            "{what} does not validate against {pointer}: {errors:#?}\n{instance:#}"
        );
    }

    fn operations(&self) -> Vec<Operation> {
        let mut ops = vec![];
        for (path, item) in self.at("/paths").as_object().unwrap() {
            for m in OPERATION_METHODS {
                let Some(op) = item.get(m) else { continue };
                ops.push(Operation {
                    id: op["operationId"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{m} {path}: no operationId"))
                        .to_owned(),
                    method: Method::from_bytes(m.to_uppercase().as_bytes()).unwrap(),
                    path: path.clone(),
                    pointer: format!("/paths/{}/{m}", esc(path)),
                    scope: op["x-required-scope"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{m} {path}: no x-required-scope"))
                        .to_owned(),
                });
            }
        }
        ops
    }

    fn operation(&self, id: &str) -> Operation {
        self.operations()
            .into_iter()
            .find(|o| o.id == id)
            .unwrap_or_else(|| panic!("no operation {id}"))
    }

    /// The methods documented for `path`, in the order of the `Allow` header.
    fn methods_of(&self, path: &str) -> Vec<Method> {
        [Method::GET, Method::POST, Method::PATCH, Method::DELETE]
            .into_iter()
            .filter(|m| {
                self.at("/paths")[path]
                    .get(m.as_str().to_lowercase())
                    .is_some()
            })
            .collect()
    }

    /// The single 2xx status of an operation.
    fn success(&self, op: &Operation) -> u16 {
        let codes: Vec<u16> = self
            .at(&format!("{}/responses", op.pointer))
            .as_object()
            .unwrap()
            .keys()
            .filter_map(|c| c.parse().ok())
            .filter(|c| (200..300).contains(c))
            .collect();
        assert_eq!(codes.len(), 1, "{}: one success status", op.id);
        codes[0]
    }

    /// `(pointer of the schema, required)` of the operation's JSON request body.
    fn request_body(&self, op: &Operation) -> Option<(String, bool)> {
        let body = self.at(&op.pointer).get("requestBody")?;
        let body_ptr = self.follow(&format!("{}/requestBody", op.pointer));
        Some((
            format!("{body_ptr}/content/application~1json/schema"),
            body.get("required") == Some(&Value::Bool(true)),
        ))
    }

    /// The named examples of the media type object at `pointer`: `examples`
    /// values and `example`.
    fn examples(&self, media_pointer: &str) -> Vec<(String, Value)> {
        let media = self.at(media_pointer);
        let mut out: Vec<(String, Value)> = media
            .get("examples")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(name, e)| {
                        let value = e.get("value").unwrap_or_else(|| {
                            panic!("{media_pointer}: example {name} has no value")
                        });
                        (name.clone(), value.clone())
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some(e) = media.get("example") {
            out.push(("example".to_owned(), e.clone()));
        }
        out
    }

    /// The query parameters of an operation: name to schema pointer.
    fn query_parameters(&self, op: &Operation) -> BTreeMap<String, String> {
        self.parameters(op)
            .into_iter()
            .filter(|(_, p)| self.at(p)["in"] == "query")
            .map(|(name, p)| (name, format!("{p}/schema")))
            .collect()
    }

    /// Every parameter (path item and operation level): name to pointer.
    fn parameters(&self, op: &Operation) -> Vec<(String, String)> {
        let path_item = format!("/paths/{}", esc(&op.path));
        let mut out = vec![];
        for owner in [path_item, op.pointer.clone()] {
            let Some(list) = self.at(&owner).get("parameters").and_then(Value::as_array) else {
                continue;
            };
            for i in 0..list.len() {
                let p = self.follow(&format!("{owner}/parameters/{i}"));
                let name = self.at(&p)["name"].as_str().unwrap().to_owned();
                out.push((name, p));
            }
        }
        out
    }

    /// Checks an answer of the server against the operation's documented
    /// responses: status, required headers and their schemas, body schema.
    fn check_reply(&self, op: &Operation, reply: &Reply) {
        let what = format!("{} {} -> {}", op.method, op.path, reply.status);
        let responses = format!("{}/responses", op.pointer);
        let code = reply.status.to_string();
        assert!(
            self.at(&responses).get(&code).is_some(),
            "{what}: status not documented: {}",
            reply.text
        );
        let resp_ptr = self.follow(&format!("{responses}/{code}"));
        let resp = self.at(&resp_ptr);
        if let Some(headers) = resp.get("headers").and_then(Value::as_object) {
            for name in headers.keys() {
                let h_ptr = self.follow(&format!("{resp_ptr}/headers/{}", esc(name)));
                let header = self.at(&h_ptr);
                let value = reply.header(name);
                if header.get("required") == Some(&Value::Bool(true)) {
                    assert!(value.is_some(), "{what}: no {name} header");
                }
                if let Some(v) = value {
                    let instance = if header["schema"]["type"] == "integer" {
                        v.parse::<i64>().map_or_else(|_| json!(v), Value::from)
                    } else {
                        json!(v)
                    };
                    self.assert_valid(
                        &format!("{h_ptr}/schema"),
                        &instance,
                        &format!("{what}: header {name}"),
                    );
                }
            }
        }
        match resp.get("content") {
            Some(content) => {
                assert!(content.get("application/json").is_some(), "{what}");
                assert_eq!(
                    reply.header("content-type"),
                    Some("application/json"),
                    "{what}"
                );
                self.assert_valid(
                    &format!("{resp_ptr}/content/application~1json/schema"),
                    &reply.json(),
                    &what,
                );
            }
            None => assert!(reply.text.is_empty(), "{what}: undocumented body"),
        }
        if reply.status >= 400 {
            assert_eq!(
                reply.json()["error"]["request_id"].as_str(),
                reply.header("x-request-id"),
                "{what}"
            );
        }
    }
}

/// Every `(pointer, object)` in `value` whose keys are the document's to
/// choose (not the instance's): used to find `$ref`s.
fn walk<'v>(value: &'v Value, pointer: String, out: &mut Vec<(String, &'v Value)>) {
    out.push((pointer.clone(), value));
    match value {
        Value::Object(m) => {
            for (k, v) in m {
                walk(v, format!("{pointer}/{}", esc(k)), out);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                walk(v, format!("{pointer}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// `example` with an unknown field added to the object at `path` (a list
/// of object keys and array indexes).
fn with_unknown_field(example: &Value, path: &[String]) -> Value {
    let mut v = example.clone();
    let mut node = &mut v;
    for seg in path {
        node = match node {
            Value::Array(a) => &mut a[seg.parse::<usize>().unwrap()],
            other => &mut other[seg.as_str()],
        };
    }
    node.as_object_mut()
        .unwrap()
        .insert(UNKNOWN_FIELD.to_owned(), json!("x"));
    v
}

/// The paths (as segments) of every object inside `value`.
fn object_paths(value: &Value, at: Vec<String>, out: &mut Vec<Vec<String>>) {
    match value {
        Value::Object(m) => {
            out.push(at.clone());
            for (k, v) in m {
                let mut next = at.clone();
                next.push(k.clone());
                object_paths(v, next, out);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                let mut next = at.clone();
                next.push(i.to_string());
                object_paths(v, next, out);
            }
        }
        _ => {}
    }
}

/// Checks that every object of `example` refuses an unknown field, except
/// `metadata` (free-form by design).
fn assert_closed(doc: &Doc, schema: &str, example: &Value, what: &str) {
    let mut paths = vec![];
    object_paths(example, vec![], &mut paths);
    for path in paths {
        if path.last().is_some_and(|s| s == "metadata") {
            continue;
        }
        let mutated = with_unknown_field(example, &path);
        assert!(
            !doc.is_valid(schema, &mutated),
            "{what}: an unknown field at /{} passes {schema}",
            path.join("/")
        );
    }
}

// === Talking to the server ===

/// Sends `req` from a loopback address of its own every 50 requests, so the
/// per-address limit (100 a minute) never interferes.
async fn send(req: AdminRequest<'_>) -> Reply {
    static SENT: AtomicU32 = AtomicU32::new(0);
    let n = SENT.fetch_add(1, Ordering::Relaxed) / 50;
    let addr = Ipv4Addr::new(127, 1, (n / 250) as u8, (n % 250 + 1) as u8);
    req.from(IpAddr::V4(addr)).send().await
}

/// `keyrouter_admin_requests_total` by `(route, code)`.
async fn admin_counts(gw: &TestGateway) -> BTreeMap<(String, String), f64> {
    let text = gw.metrics().await;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("keyrouter_admin_requests_total{") else {
            continue;
        };
        let (labels, value) = rest.rsplit_once("} ").unwrap();
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_owned())
                .unwrap()
        };
        out.insert((label("route"), label("code")), value.parse().unwrap());
    }
    out
}

/// The management API with every answer checked against the document.
struct Api<'g> {
    gw: &'g TestGateway,
    doc: &'static Doc,
    materials: AtomicU32,
}

impl<'g> Api<'g> {
    fn new(gw: &'g TestGateway) -> Self {
        Api {
            gw,
            doc: doc(),
            materials: AtomicU32::new(0),
        }
    }

    fn op(&self, id: &str) -> Operation {
        self.doc.operation(id)
    }

    /// A request for `op` with `id` and a raw query (`?a=b` or empty),
    /// authenticated with the API key.
    fn request(&self, op: &Operation, id: &str, query: &str) -> AdminRequest<'g> {
        self.gw
            .request(op.method.clone(), &format!("{}{query}", op.url(id)))
    }

    /// Sends and checks the answer against `op`'s documented responses.
    async fn send(&self, op: &Operation, req: AdminRequest<'_>) -> Reply {
        let reply = send(req).await;
        self.doc.check_reply(op, &reply);
        reply
    }

    /// Calls operation `op_id` with the API key.
    async fn call(&self, op_id: &str, id: &str, query: &str, body: Option<Value>) -> Reply {
        let op = self.op(op_id);
        let mut req = self.request(&op, id, query);
        if let Some(body) = body {
            req = req.json(body);
        }
        self.send(&op, req).await
    }

    /// Like [`Api::call`], expecting `status`.
    async fn expect(
        &self,
        status: u16,
        op_id: &str,
        id: &str,
        query: &str,
        body: Option<Value>,
    ) -> Value {
        let reply = self.call(op_id, id, query, body).await;
        assert_eq!(reply.status, status, "{op_id} {id}{query}: {}", reply.text);
        reply.json()
    }

    /// Fresh key material, never used before in this gateway.
    fn material(&self) -> String {
        let n = self.materials.fetch_add(1, Ordering::Relaxed);
        format!("sk-OPENAPI-{n:06}-0123456789")
    }

    /// Registers a fresh key for `provider`; its id.
    async fn fresh_key(&self, provider: &str) -> String {
        let body = json!({"key_material": self.material(), "provider_id": provider});
        let key = self.expect(201, "createKey", "", "", Some(body)).await;
        key["id"].as_str().unwrap().to_owned()
    }

    /// A key ready for `op` to succeed on: fresh, and `invalid` for
    /// `reactivateKey`. Empty for routes without an id.
    async fn key_for(&self, op: &Operation) -> String {
        if !op.has_id() {
            return String::new();
        }
        let id = self.fresh_key("openai").await;
        if op.id == "reactivateKey" {
            self.gw.set_state(&id, KeyStatus::Invalid).await;
        }
        id
    }
}

// === The document alone ===

#[test]
fn the_document_is_openapi_3_1_with_every_reference_resolved() {
    let d = doc();
    assert!(
        d.at("/openapi").as_str().unwrap().starts_with("3.1."),
        "OpenAPI 3.1"
    );
    assert_eq!(d.at("/servers/0/url"), "http://127.0.0.1:8081");
    let mut nodes = vec![];
    walk(&d.root, String::new(), &mut nodes);
    for (pointer, node) in nodes {
        if let Some(r) = node.get("$ref").and_then(Value::as_str) {
            let target = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("{pointer}: $ref {r} leaves the document"));
            assert!(d.root.pointer(target).is_some(), "{pointer}: $ref {r}");
        }
    }
    // Every named schema compiles.
    for name in d.at("/components/schemas").as_object().unwrap().keys() {
        d.validator(&format!("/components/schemas/{}", esc(name)));
    }

    // Security schemes as the contract has them.
    let schemes = d.at("/components/securitySchemes");
    assert_eq!(
        schemes["ApiKey"],
        json!({"type": "apiKey", "in": "header", "name": "X-API-Key",
               "description": schemes["ApiKey"]["description"]})
    );
    assert_eq!(schemes["BearerJwt"]["type"], "http");
    assert_eq!(schemes["BearerJwt"]["scheme"], "bearer");
    assert_eq!(schemes["BearerJwt"]["bearerFormat"], "JWT");
    let jwt_text = schemes["BearerJwt"]["description"].as_str().unwrap();
    assert!(jwt_text.contains("HS256"));
    for scope in SCOPES {
        assert!(jwt_text.contains(scope), "{scope} is described");
    }

    // The closed sets of the document are the implementation's.
    let enum_of = |pointer: &str| -> BTreeSet<String> {
        d.at(pointer)
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        enum_of("/components/schemas/GatewayError/properties/error/properties/type/enum"),
        ERROR_TYPES.iter().map(|s| (*s).to_owned()).collect()
    );
    assert_eq!(
        enum_of("/components/schemas/AuditEventKind/enum"),
        EventKind::ALL
            .iter()
            .map(|k| k.as_str().to_owned())
            .collect()
    );
    assert_eq!(
        enum_of("/components/schemas/AuditEvent/properties/action/enum"),
        EventKind::ALL
            .iter()
            .map(|k| k.action().to_owned())
            .collect()
    );
    assert_eq!(
        enum_of("/components/schemas/KeyState/enum"),
        KeyState::ALL
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect()
    );

    // What the info text promises to describe.
    let info = d.at("/info/description").as_str().unwrap();
    for phrase in [
        "100 requests",
        "Retry-After",
        "Fail-closed",
        "never echoes the value",
        "auth_failed",
        "64 KiB",
    ] {
        assert!(info.contains(phrase), "info.description mentions {phrase}");
    }
}

#[test]
fn every_operation_documents_its_scope_errors_and_examples() {
    let d = doc();
    let ops = d.operations();
    let ids: BTreeSet<&str> = ops.iter().map(|o| o.id.as_str()).collect();
    assert_eq!(ids.len(), ops.len(), "operationIds are unique");
    for op in &ops {
        let o = d.at(&op.pointer);
        let what = format!("{} {}", op.method, op.path);
        assert!(op.path.starts_with("/admin/v1/"), "{what}");

        // Scope: x-required-scope, and the same scope under the JWT scheme.
        assert!(SCOPES.contains(&op.scope.as_str()), "{what}: {}", op.scope);
        assert_eq!(
            o["security"],
            json!([{"ApiKey": []}, {"BearerJwt": [op.scope]}]),
            "{what}"
        );

        // Path parameters: exactly those of the template.
        let params = d.parameters(op);
        let in_path: BTreeSet<&str> = params
            .iter()
            .filter(|(_, p)| d.at(p)["in"] == "path")
            .map(|(n, _)| n.as_str())
            .collect();
        let expected: BTreeSet<&str> = if op.has_id() {
            BTreeSet::from(["id"])
        } else {
            BTreeSet::new()
        };
        assert_eq!(in_path, expected, "{what}");
        for (name, p) in &params {
            let param = d.at(p);
            if param["in"] == "path" {
                assert_eq!(param["required"], true, "{what}: {name}");
                assert_eq!(param["schema"]["pattern"], "^key_[a-z0-9]{8,32}$");
            }
            let example = param
                .get("example")
                .unwrap_or_else(|| panic!("{what}: parameter {name} has no example"));
            d.assert_valid(&format!("{p}/schema"), example, &format!("{what}: {name}"));
        }

        // Responses: one success with examples; every error is a GatewayError.
        let responses = d.at(&format!("{}/responses", op.pointer));
        let success = d.success(op);
        for required in ["401", "403", "405", "429", "500", "503"] {
            assert!(responses.get(required).is_some(), "{what}: no {required}");
        }
        if op.id != "listProviders" {
            assert!(responses.get("400").is_some(), "{what}: no 400");
        }
        if op.has_id() {
            assert!(responses.get("404").is_some(), "{what}: no 404");
        }
        for (code, _) in responses.as_object().unwrap() {
            let status: u16 = code.parse().unwrap();
            let r_ptr = d.follow(&format!("{}/responses/{code}", op.pointer));
            let r = d.at(&r_ptr);
            assert!(r["description"].is_string(), "{what} {code}");
            assert!(
                r["headers"].get("x-request-id").is_some(),
                "{what} {code}: x-request-id"
            );
            let media = format!("{r_ptr}/content/application~1json");
            let schema = format!("{media}/schema");
            if status >= 400 {
                assert_eq!(
                    d.at(&schema),
                    &json!({"$ref": "#/components/schemas/GatewayError"}),
                    "{what} {code}"
                );
            }
            let examples = d.examples(&media);
            if status == success {
                assert!(!examples.is_empty(), "{what} {code}: no example");
            }
            for (name, example) in examples {
                let label = format!("{what} {code} example {name}");
                d.assert_valid(&schema, &example, &label);
                if status == success {
                    assert_closed(d, &schema, &example, &label);
                }
                if status >= 400 {
                    assert_eq!(
                        example["error"]["type"],
                        if matches!(status, 400 | 405 | 408) {
                            "invalid_request"
                        } else {
                            match status {
                                401 => "unauthorized",
                                403 => "forbidden",
                                404 => "not_found",
                                409 => "conflict",
                                429 => "rate_limit_exceeded",
                                _ => "internal_error",
                            }
                        },
                        "{label}"
                    );
                }
            }
        }
        let header = |code: &str, name: &str| {
            let r = d.follow(&format!("{}/responses/{code}", op.pointer));
            d.at(&r)["headers"].get(name).is_some()
        };
        assert!(header("429", "Retry-After"), "{what}: 429 has Retry-After");
        assert!(header("405", "Allow"), "{what}: 405 has Allow");

        // Request bodies: JSON with examples, each valid and closed.
        if let Some((schema, _)) = d.request_body(op) {
            let media = schema.trim_end_matches("/schema").to_owned();
            let examples = d.examples(&media);
            assert!(!examples.is_empty(), "{what}: request body without example");
            for (name, example) in examples {
                let label = format!("{what} request example {name}");
                d.assert_valid(&schema, &example, &label);
                assert_closed(d, &schema, &example, &label);
            }
        } else {
            assert!(
                op.method == Method::GET || op.method == Method::DELETE,
                "{what}: a write without a request body"
            );
        }
    }
}

#[test]
fn the_router_serves_exactly_the_documented_routes() {
    let served: BTreeSet<(String, String, String)> = keyrouter::admin::routes()
        .into_iter()
        .map(|(m, path, scope)| (m.to_string(), path.to_owned(), scope.to_owned()))
        .collect();
    let documented: BTreeSet<(String, String, String)> = doc()
        .operations()
        .into_iter()
        .map(|o| (o.method.to_string(), o.path, o.scope))
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "served but not documented (or with another scope): {undocumented:?}\n\
         documented but not served (or with another scope): {unserved:?}"
    );
    assert_eq!(served.len(), 10);
}

// === The document against the server ===

#[tokio::test]
async fn every_documented_route_answers_with_its_scope() {
    let gw = TestGateway::start().await;
    let api = Api::new(&gw);
    let d = api.doc;
    // The router's "no such route" answer, for contrast.
    let before = admin_counts(&gw).await;
    let reply = send(gw.get("/keys/key_00000000/nothing")).await;
    assert_eq!(reply.status, 404);
    let after = admin_counts(&gw).await;
    let key = ("unmatched".to_owned(), "404".to_owned());
    assert_eq!(
        after.get(&key),
        Some(&(before.get(&key).unwrap_or(&0.0) + 1.0))
    );

    for op in d.operations() {
        let what = format!("{} {}", op.method, op.path);
        let id = if op.has_id() { PLACEHOLDER_ID } else { "" };
        // With the API key: matched under the documented template, whatever
        // the answer (a 404 for the placeholder id is "no such key").
        let before = admin_counts(&gw).await;
        let reply = api.send(&op, api.request(&op, id, "")).await;
        assert!(
            ![401, 403, 405].contains(&reply.status),
            "{what}: {}",
            reply.text
        );
        let after = admin_counts(&gw).await;
        let counted = (op.path.clone(), reply.status.to_string());
        assert_eq!(
            after.get(&counted),
            Some(&(before.get(&counted).unwrap_or(&0.0) + 1.0)),
            "{what}: counted under its template"
        );
        if reply.status == 404 {
            assert_eq!(reply.json()["error"]["message"], "No key with this id.");
        }

        // A token with every scope but the required one: 403.
        let others: Vec<&str> = SCOPES.iter().copied().filter(|s| *s != op.scope).collect();
        let reply = api
            .send(
                &op,
                api.request(&op, id, "")
                    .bearer(&token("scope-probe", &others.join(" "))),
            )
            .await;
        assert_eq!(reply.status, 403, "{what} without {}", op.scope);
        // A token with only the required scope: let through.
        let reply = api
            .send(
                &op,
                api.request(&op, id, "")
                    .bearer(&token("scope-probe", &op.scope)),
            )
            .await;
        assert!(
            ![401, 403, 405].contains(&reply.status),
            "{what} with only {}: {}",
            op.scope,
            reply.text
        );
        // Without credentials: 401, as documented.
        let reply = api.send(&op, api.request(&op, id, "").no_auth()).await;
        assert_eq!(reply.status, 401, "{what}");
    }

    // Every other method on a documented path: 405 naming the documented ones.
    let paths: BTreeSet<String> = d.operations().into_iter().map(|o| o.path).collect();
    for path in paths {
        let documented = d.methods_of(&path);
        let allow = documented
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        let any_op = d.operations().into_iter().find(|o| o.path == path).unwrap();
        for method in [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ] {
            if documented.contains(&method) {
                continue;
            }
            let url = any_op.url(PLACEHOLDER_ID);
            let reply = api.send(&any_op, gw.request(method.clone(), &url)).await;
            assert_eq!(reply.status, 405, "{method} {path}");
            assert_eq!(
                reply.header("allow"),
                Some(allow.as_str()),
                "{method} {path}"
            );
        }
    }
    gw.stop().await;
}

#[tokio::test]
async fn request_examples_get_the_documented_success() {
    let gw = TestGateway::start().await;
    let api = Api::new(&gw);
    let d = api.doc;
    let mut sent = 0;
    for op in d.operations() {
        let Some((schema, required)) = d.request_body(&op) else {
            continue;
        };
        let success = d.success(&op);
        let media = schema.trim_end_matches("/schema").to_owned();
        for (name, example) in d.examples(&media) {
            let what = format!("{} {} example {name}", op.method, op.path);
            let id = api.key_for(&op).await;
            let reply = api
                .send(&op, api.request(&op, &id, "").json(example.clone()))
                .await;
            assert_eq!(reply.status, success, "{what}: {}", reply.text);
            sent += 1;

            // The same with an unknown field: refused by the schema and by
            // the server alike.
            let extra = with_unknown_field(&example, &[]);
            assert!(!d.is_valid(&schema, &extra), "{what}");
            let id = api.key_for(&op).await;
            let reply = api.send(&op, api.request(&op, &id, "").json(extra)).await;
            assert_eq!(reply.status, 400, "{what} with an unknown field");
            let message = reply.json()["error"]["message"]
                .as_str()
                .unwrap()
                .to_owned();
            assert!(message.contains(UNKNOWN_FIELD), "{what}: {message}");
        }
        // An optional body may be left out.
        if !required {
            let id = api.key_for(&op).await;
            let reply = api.send(&op, api.request(&op, &id, "")).await;
            assert_eq!(reply.status, success, "{} without a body", op.id);
        }
    }
    assert!(sent >= 6, "{sent} examples sent");
    gw.stop().await;
}

#[tokio::test]
async fn real_answers_match_the_documented_schemas() {
    let gw = TestGateway::start().await;
    let api = Api::new(&gw);

    // Registration, full and minimal.
    let a = api
        .expect(
            201,
            "createKey",
            "",
            "",
            Some(json!({
                "key_material": "sk-REAL-answers-a-0123456789",
                "provider_id": "openai",
                "label": "team-a production",
                "limits": {"rpm": 500, "tpm": 200000, "max_concurrent": 50},
                "weight": 3,
                "metadata": {"owner": "team-a", "env": "prod"}
            })),
        )
        .await;
    let a = a["id"].as_str().unwrap().to_owned();
    // The same material again for the same provider.
    api.expect(
        409,
        "createKey",
        "",
        "",
        Some(json!({"key_material": "sk-REAL-answers-a-0123456789", "provider_id": "openai"})),
    )
    .await;
    let b = api.fresh_key("anthropic").await;
    let c = api.fresh_key("openai").await;

    // Listings, filtered and paged.
    let all = api.expect(200, "listKeys", "", "", None).await;
    assert_eq!(all["keys"].as_array().unwrap().len(), 3);
    let query = "?provider_id=openai&state=active&limit=1";
    let page = api.expect(200, "listKeys", "", query, None).await;
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let next = api
        .expect(
            200,
            "listKeys",
            "",
            &format!("{query}&cursor={cursor}"),
            None,
        )
        .await;
    assert_eq!(next["next_cursor"], Value::Null);

    // Reading, with usage; a cooling-down key has cooldown_until.
    api.expect(200, "getKey", &a, "", None).await;
    let until = chrono::Utc::now() + chrono::Duration::seconds(300);
    gw.set_state(&c, KeyStatus::CoolingDown { until }).await;
    let cooling = api.expect(200, "getKey", &c, "", None).await;
    assert!(cooling["cooldown_until"].is_string(), "{cooling}");

    // Changes.
    api.expect(
        200,
        "updateKey",
        &a,
        "",
        Some(json!({"label": null, "limits": {"rpm": 7}, "weight": 2, "metadata": {}})),
    )
    .await;
    api.expect(400, "updateKey", &a, "", Some(json!({}))).await;
    api.expect(
        200,
        "revokeKey",
        &a,
        "",
        Some(json!({"reason": "rotated out"})),
    )
    .await;
    api.expect(409, "revokeKey", &a, "", None).await;
    api.expect(409, "reactivateKey", &c, "", None).await;
    gw.set_state(&b, KeyStatus::Invalid).await;
    let back = api.expect(200, "reactivateKey", &b, "", None).await;
    assert_eq!(back["state"], "active");
    api.expect(200, "deleteKey", &a, "", None).await;
    api.expect(409, "deleteKey", &a, "", None).await;
    let deleted = api.expect(200, "getKey", &a, "", None).await;
    assert_eq!(deleted["state"], "revoked");

    // Errors of the key routes.
    api.expect(404, "getKey", PLACEHOLDER_ID, "", None).await;
    api.expect(
        404,
        "updateKey",
        PLACEHOLDER_ID,
        "",
        Some(json!({"weight": 2})),
    )
    .await;
    api.expect(400, "getKey", "key_NOT_VALID", "", None).await;
    api.expect(
        400,
        "createKey",
        "",
        "",
        Some(json!({"key_material": "short", "provider_id": "openai"})),
    )
    .await;
    api.expect(400, "listKeys", "", "?state=asleep", None).await;
    api.expect(
        400,
        "rotateEncryption",
        "",
        "",
        Some(json!({"force": true})),
    )
    .await;

    // Providers and rotation (the deleted key has no material to rotate).
    let providers = api.expect(200, "listProviders", "", "", None).await;
    assert_eq!(providers["providers"].as_array().unwrap().len(), 2);
    let rotated = api.expect(200, "rotateEncryption", "", "", None).await;
    assert_eq!(rotated, json!({"reencrypted": 2}));

    // Refusals, which the audit log records.
    let op = api.op("getKey");
    let reply = api.send(&op, api.request(&op, &a, "").no_auth()).await;
    assert_eq!(reply.status, 401);
    let op = api.op("listAuditEvents");
    let reply = api
        .send(
            &op,
            api.request(&op, "", "")
                .bearer(&token("reader", "keys:read")),
        )
        .await;
    assert_eq!(reply.status, 403);
    gw.wait_for_events(EventKind::AuthFailed, 2).await;

    // The audit log holds every kind of event; all of them validate.
    let log = api
        .expect(200, "listAuditEvents", "", "?limit=200", None)
        .await;
    let events = log["events"].as_array().unwrap();
    let kinds: BTreeSet<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    let all_kinds: BTreeSet<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
    assert_eq!(kinds, all_kinds);
    assert!(
        events
            .iter()
            .filter(|e| e["event"] == "auth_failed")
            .all(|e| e["client_addr"].is_string())
    );
    let page = api
        .expect(200, "listAuditEvents", "", "?limit=2", None)
        .await;
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    api.expect(
        200,
        "listAuditEvents",
        "",
        &format!("?limit=2&cursor={cursor}"),
        None,
    )
    .await;
    let filtered = api
        .expect(
            200,
            "listAuditEvents",
            "",
            &format!(
                "?resource={a}&event=key_revoked&since=2000-01-01T00:00:00Z&until=2999-01-01T00:00:00%2B02:00"
            ),
            None,
        )
        .await;
    assert_eq!(filtered["events"].as_array().unwrap().len(), 1);
    api.expect(400, "listAuditEvents", "", "?event=key_exploded", None)
        .await;
    gw.stop().await;
}

/// One input case: an operation, a query or body, and a label.
enum Input {
    Body(&'static str, Value),
    Query(&'static str, String),
    Id(&'static str, String),
}

#[tokio::test]
async fn schemas_and_server_draw_the_same_lines() {
    let gw = TestGateway::start().await;
    let api = Api::new(&gw);
    let d = api.doc;
    const M: &str = "MATERIAL";
    let create = |extra: Value| {
        let mut body = json!({"key_material": M, "provider_id": "openai"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        Input::Body("createKey", body)
    };
    let material = |m: String| {
        Input::Body(
            "createKey",
            json!({"key_material": m, "provider_id": "openai"}),
        )
    };
    let one = |k: String, v: Value| -> Value { Value::Object([(k, v)].into_iter().collect()) };
    let entries = |n: usize| -> Value {
        (0..n)
            .map(|i| (format!("k{i}"), json!("v")))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let mut cases = vec![
        material("sk-012345".into()),
        material("sk-0123456".into()),
        material(format!("sk-{}", "a".repeat(197))),
        material(format!("sk-{}", "b".repeat(198))),
        material("sk-with space-0123456789".into()),
        material("sk-with\ttab-0123456789".into()),
        material("sk-ÜNICODE-0123456789".into()),
        material("!\"#$%&'()*+,-./0123456789:;<=>?@[\\]^_`{|}~".into()),
        Input::Body(
            "createKey",
            json!({"key_material": 1234567890123_u64, "provider_id": "openai"}),
        ),
        Input::Body("createKey", json!({"provider_id": "openai"})),
        Input::Body("createKey", json!({"key_material": M})),
        create(json!({"label": ""})),
        create(json!({"label": "L".repeat(64)})),
        create(json!({"label": "L".repeat(65)})),
        create(json!({"label": "é".repeat(64)})),
        create(json!({"label": "bell\u{7}"})),
        create(json!({"label": "next line\u{85}"})),
        create(json!({"label": null})),
        create(json!({"limits": {}})),
        create(json!({"limits": null})),
        create(json!({"limits": [1, 2]})),
        create(json!({"limits": {"rpm": 0}})),
        create(json!({"limits": {"rpm": 1}})),
        create(json!({"limits": {"rpm": 1_000_000}})),
        create(json!({"limits": {"rpm": 1_000_001}})),
        create(json!({"limits": {"rpm": null, "tpm": 1_000_000_000}})),
        create(json!({"limits": {"tpm": 1_000_000_001}})),
        create(json!({"limits": {"max_concurrent": 100_000}})),
        create(json!({"limits": {"max_concurrent": 100_001}})),
        create(json!({"limits": {"rpm": -1}})),
        create(json!({"limits": {"rpm": "5"}})),
        create(json!({"limits": {"rpx": 5}})),
        create(json!({"weight": 0})),
        create(json!({"weight": 1})),
        create(json!({"weight": 1000})),
        create(json!({"weight": 1001})),
        create(json!({"weight": null})),
        create(json!({"weight": 2.5})),
        create(json!({"weight": "3"})),
        create(json!({"metadata": {}})),
        create(json!({"metadata": null})),
        create(json!({"metadata": entries(16)})),
        create(json!({"metadata": entries(17)})),
        create(json!({"metadata": {"BadKey": "v"}})),
        create(json!({"metadata": one("k".repeat(32), json!("v"))})),
        create(json!({"metadata": one("k".repeat(33), json!("v"))})),
        create(json!({"metadata": {"": "v"}})),
        create(json!({"metadata": {"k": "v".repeat(256)}})),
        create(json!({"metadata": {"k": "v".repeat(257)}})),
        create(json!({"metadata": {"k": ""}})),
        create(json!({"metadata": {"k": 5}})),
        create(json!({"metadata": ["k"]})),
        create(json!({"id": "key_abcdefgh"})),
        Input::Body("updateKey", json!({})),
        Input::Body("updateKey", json!({"label": null})),
        Input::Body("updateKey", json!({"label": "new"})),
        Input::Body("updateKey", json!({"weight": null})),
        Input::Body("updateKey", json!({"limits": null})),
        Input::Body("updateKey", json!({"metadata": null, "weight": null})),
        Input::Body("updateKey", json!({"limits": null, "label": "x"})),
        Input::Body("updateKey", json!({"limits": {"tpm": 5}})),
        Input::Body("updateKey", json!({"weight": 1001})),
        Input::Body("updateKey", json!({"metadata": entries(17)})),
        Input::Body(
            "updateKey",
            json!({"key_material": "sk-PATCHED-0123456789"}),
        ),
        Input::Body("updateKey", json!({"state": "active"})),
        Input::Body("revokeKey", json!({})),
        Input::Body("revokeKey", json!({"reason": null})),
        Input::Body("revokeKey", json!({"reason": ""})),
        Input::Body("revokeKey", json!({"reason": "r".repeat(256)})),
        Input::Body("revokeKey", json!({"reason": "r".repeat(257)})),
        Input::Body("revokeKey", json!({"reason": "line\nbreak"})),
        Input::Body("revokeKey", json!({"reason": 5})),
        Input::Body("revokeKey", json!({"why": "x"})),
        Input::Body("reactivateKey", json!({})),
        Input::Body("reactivateKey", json!({"force": true})),
        Input::Body("rotateEncryption", json!({})),
        Input::Body("rotateEncryption", json!({"force": true})),
        Input::Body("createKey", json!([])),
    ];
    for q in [
        "limit=0",
        "limit=1",
        "limit=200",
        "limit=201",
        "limit=ten",
        "limit=-1",
        "state=active",
        "state=cooling_down",
        "state=asleep",
        "provider_id=openai",
        "provider_id=nosuchprovider",
        "provider_id=OpenAI",
        &format!("provider_id={}", "p".repeat(32)),
        &format!("provider_id={}", "p".repeat(33)),
        "sort=asc",
        "state=",
    ] {
        cases.push(Input::Query("listKeys", format!("?{q}")));
    }
    for q in [
        "event=key_registered",
        "event=auth_failed",
        "event=key_exploded",
        "since=2026-11-23T10:30:00Z",
        "since=2026-11-23T12:30:00+02:00",
        "since=2026-11-23T12:30:00%2B02:00",
        "since=2026-11-23",
        "until=yesterday",
        "until=2026-11-23T10:30:00.123456Z",
        &format!("resource={}", "r".repeat(64)),
        &format!("resource={}", "r".repeat(65)),
        "resource=%2Fadmin%2Fv1%2Fkeys",
        "limit=200",
        "limit=201",
        "actor=router",
    ] {
        cases.push(Input::Query("listAuditEvents", format!("?{q}")));
    }
    for id in [
        "key_abcdefgh".to_owned(),
        "key_abcdefg".to_owned(),
        format!("key_{}", "a".repeat(32)),
        format!("key_{}", "a".repeat(33)),
        "key_ABCDEFGH".to_owned(),
        "key_abcd-efgh".to_owned(),
        "abcdefgh".to_owned(),
    ] {
        cases.push(Input::Id("getKey", id));
    }

    let mut disagreements = vec![];
    for case in cases {
        let (op, doc_ok, reply, what) = match case {
            Input::Body(op_id, mut body) => {
                let op = api.op(op_id);
                if body.get("key_material") == Some(&json!(M)) {
                    body["key_material"] = json!(api.material());
                }
                let (schema, _) = d.request_body(&op).unwrap();
                let doc_ok = d.is_valid(&schema, &body);
                let id = api.key_for(&op).await;
                let what = format!("{op_id} {body}");
                let reply = api.send(&op, api.request(&op, &id, "").json(body)).await;
                (op, doc_ok, reply, what)
            }
            Input::Query(op_id, query) => {
                let op = api.op(op_id);
                let params = d.query_parameters(&op);
                let mut seen = BTreeSet::new();
                let doc_ok = query[1..].split('&').all(|pair| {
                    let (name, raw) = pair.split_once('=').unwrap_or((pair, ""));
                    let Some(schema) = params.get(name) else {
                        return false;
                    };
                    if !seen.insert(name.to_owned()) {
                        return false;
                    }
                    let Some(value) = percent_decode(raw) else {
                        return false;
                    };
                    if value.is_empty() {
                        return true; // Empty counts as not given.
                    }
                    let instance = if d.at(schema)["type"] == "integer" {
                        value
                            .parse::<i64>()
                            .map_or_else(|_| json!(value), Value::from)
                    } else {
                        json!(value)
                    };
                    d.is_valid(schema, &instance)
                });
                let what = format!("{op_id} {query}");
                let reply = api.send(&op, api.request(&op, "", &query)).await;
                (op, doc_ok, reply, what)
            }
            Input::Id(op_id, id) => {
                let op = api.op(op_id);
                let (_, p) = d
                    .parameters(&op)
                    .into_iter()
                    .find(|(n, _)| n == "id")
                    .unwrap();
                let doc_ok = d.is_valid(&format!("{p}/schema"), &json!(id));
                let what = format!("{op_id} id {id}");
                let reply = api.send(&op, api.request(&op, &id, "")).await;
                // A well-formed id that names no key is a 404, not a 400.
                (op, doc_ok, reply, what)
            }
        };
        let server_ok = reply.status != 400;
        if reply.status == 400 {
            let message = reply.json()["error"]["message"]
                .as_str()
                .unwrap()
                .to_owned();
            assert!(!message.is_empty(), "{what}");
        } else {
            assert!(
                reply.status == d.success(&op) || reply.status == 404,
                "{what}: {} {}",
                reply.status,
                reply.text
            );
        }
        if doc_ok != server_ok {
            disagreements.push(format!(
                "{what}: document {}, server {} {}",
                if doc_ok { "accepts" } else { "refuses" },
                reply.status,
                reply.text
            ));
        }
    }
    assert!(
        disagreements.is_empty(),
        "the document and the server disagree:\n{}",
        disagreements.join("\n")
    );
    gw.stop().await;
}

#[tokio::test]
async fn rate_limited_and_fail_closed_answers_are_documented() {
    let gw = TestGateway::start().await;
    let api = Api::new(&gw);
    let op = api.op("listProviders");
    let noisy = IpAddr::V4(Ipv4Addr::new(127, 2, 0, 1));
    for _ in 0..100 {
        let reply = api.request(&op, "", "").from(noisy).send().await;
        assert_eq!(reply.status, 200);
    }
    let reply = api.request(&op, "", "").from(noisy).send().await;
    api.doc.check_reply(&op, &reply);
    assert_eq!(reply.status, 429);
    assert_eq!(reply.json()["error"]["type"], "rate_limit_exceeded");
    gw.stop().await;

    // No admin secret at all: every documented operation answers 401.
    let closed = TestGateway::builder()
        .without_api_key()
        .without_jwt_secret()
        .start()
        .await;
    let api = Api::new(&closed);
    for op in api.doc.operations() {
        let id = if op.has_id() { PLACEHOLDER_ID } else { "" };
        let reply = api.send(&op, api.request(&op, id, "")).await;
        assert_eq!(reply.status, 401, "{} {}", op.method, op.path);
        let reply = api
            .send(
                &op,
                api.request(&op, id, "")
                    .auth(Auth::Bearer(token("ops", SCOPES.join(" ").as_str()))),
            )
            .await;
        assert_eq!(reply.status, 401, "{} {}", op.method, op.path);
    }
    closed.stop().await;
}
