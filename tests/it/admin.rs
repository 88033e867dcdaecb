//! The admin HTTP API, served on 127.0.0.1 against a real database and driven with
//! reqwest: authentication, the error shape, pagination, re-drive, replay, test events,
//! secret rotation, parking, and the OpenAPI document against the routes.

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, Method, StatusCode};
use outboxd::admin::{AdminState, ROUTES};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::harness::{
    Receiver, Reply, RunningDispatcher, Spawned, TestDb, WAIT, eventually, outboxd_command,
    run_to_end, sigterm, test_config,
};

const TOKEN: &str = "test-admin-token-0123456789abcdef";
const SECRET_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SECRET_B: &str = "whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3";

// ---------------------------------------------------------------------------------------
// A client for the API under test
// ---------------------------------------------------------------------------------------

/// The admin API served on 127.0.0.1:0 for one test; stopped when dropped.
struct Api {
    base: String,
    http: reqwest::Client,
    stop: CancellationToken,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

/// An answer: status, headers, and the body as JSON (`Null` when empty).
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    raw: String,
    json: Value,
}

impl Answer {
    /// Asserts the status, and returns the JSON body.
    fn expect(self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "unexpected answer: {self:#?}");
        self.json
    }

    /// Asserts an error answer: the status, the exact shape, the code; returns the message.
    fn expect_error(self, status: StatusCode, code: &str) -> String {
        assert_eq!(self.status, status, "unexpected answer: {self:#?}");
        assert_error_shape(&self.json, code);
        assert!(
            self.headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/json")),
            "errors are JSON: {self:#?}"
        );
        self.json["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

fn assert_error_shape(body: &Value, code: &str) {
    let object = body
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {body}"));
    assert_eq!(object.len(), 1, "only `error` at the top: {body}");
    let error = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("no error object: {body}"));
    let mut keys: Vec<&str> = error.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message"], "{body}");
    assert_eq!(error["code"], json!(code), "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "a message: {body}"
    );
}

impl Api {
    async fn start(db: &TestDb) -> Self {
        Self::with_grace(db, Duration::from_secs(3600)).await
    }

    async fn with_grace(db: &TestDb, rotation_grace: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the admin API");
        let addr = listener.local_addr().expect("admin API address");
        let state = AdminState::new(db.pool().await, TOKEN, rotation_grace);
        let stop = CancellationToken::new();
        let server = tokio::spawn(outboxd::admin::serve(listener, state, stop.clone()));
        Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            stop,
            server: Some(server),
        }
    }

    /// Any request: `authorization` is the whole header value (none when `None`);
    /// `body` is sent as-is with `content_type` when given.
    async fn send(
        &self,
        method: Method,
        path: &str,
        authorization: Option<&str>,
        content_type: Option<&str>,
        body: Option<String>,
    ) -> Answer {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        if let Some(value) = content_type {
            request = request.header("content-type", value);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await.expect("the admin API answers");
        let status = response.status();
        let headers = response.headers().clone();
        let raw = response.text().await.expect("read the answer");
        let json = if raw.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&raw).unwrap_or_else(|e| panic!("not JSON ({e}): {raw:?}"))
        };
        Answer {
            status,
            headers,
            raw,
            json,
        }
    }

    /// A request with the right token; a JSON body when `body` is not `None`.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        let bearer = format!("Bearer {TOKEN}");
        match body {
            Some(body) => {
                self.send(
                    method,
                    path,
                    Some(&bearer),
                    Some("application/json"),
                    Some(body.to_string()),
                )
                .await
            }
            None => self.send(method, path, Some(&bearer), None, None).await,
        }
    }

    async fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> Answer {
        self.call(Method::POST, path, Some(body)).await
    }

    /// POST without a body.
    async fn post_empty(&self, path: &str) -> Answer {
        self.call(Method::POST, path, None).await
    }

    async fn patch(&self, path: &str, body: Value) -> Answer {
        self.call(Method::PATCH, path, Some(body)).await
    }

    async fn delete(&self, path: &str) -> Answer {
        self.call(Method::DELETE, path, None).await
    }

    /// Registers an endpoint through the API; returns `(id, secret)`.
    async fn add_endpoint(
        &self,
        url: &str,
        event_types: &[&str],
        secret: Option<&str>,
    ) -> (i64, String) {
        let mut body = json!({ "url": url, "event_types": event_types });
        if let Some(secret) = secret {
            body["secret"] = json!(secret);
        }
        let created = self
            .post("/v1/endpoints", body)
            .await
            .expect(StatusCode::CREATED);
        (
            created["id"].as_i64().expect("an id"),
            created["secret"].as_str().expect("a secret").to_owned(),
        )
    }

    /// Pages through `path` (which has no `after`) with `limit`; returns the pages.
    async fn pages(&self, path: &str, limit: u32) -> Vec<Value> {
        let mut pages = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let url = match &after {
                Some(cursor) => format!("{path}{sep}limit={limit}&after={cursor}"),
                None => format!("{path}{sep}limit={limit}"),
            };
            let page = self.get(&url).await.expect(StatusCode::OK);
            after = page["next_cursor"].as_str().map(str::to_owned);
            pages.push(page);
            if after.is_none() {
                return pages;
            }
            assert!(pages.len() < 100, "pagination does not end");
        }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// The OpenAPI document, parsed.
fn document() -> Value {
    serde_json::from_str(outboxd::admin::OPENAPI_JSON).expect("docs/openapi.json is JSON")
}

/// A concrete path for a route template.
fn concrete(path: &str) -> String {
    if path.starts_with("/v1/deliveries/") {
        path.replace("{id}", "1:1")
    } else {
        path.replace("{id}", "1")
    }
}

fn method(name: &str) -> Method {
    Method::from_bytes(name.as_bytes()).expect("an HTTP method")
}

/// Inserts pending deliveries of every event to `endpoint_id` and marks the events fanned
/// out, as the dispatcher's claim would (without sending anything).
async fn fan_out_by_sql(db: &TestDb, endpoint_id: i64) {
    db.client
        .execute(
            "INSERT INTO webhook_deliveries (event_id, endpoint_id)
             SELECT id, $1 FROM webhook_outbox ON CONFLICT DO NOTHING",
            &[&endpoint_id],
        )
        .await
        .expect("insert deliveries");
    db.client
        .execute(
            "UPDATE webhook_outbox SET processed_at = now() WHERE processed_at IS NULL",
            &[],
        )
        .await
        .expect("mark fanned out");
}

fn ids(items: &Value) -> Vec<Value> {
    items["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| item["id"].clone())
        .collect()
}

// ---------------------------------------------------------------------------------------
// A small checker of values against the document's schemas, so the hand-written
// document cannot drift from what the API answers.
// ---------------------------------------------------------------------------------------

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("external $ref {reference}"));
            let target = doc
                .pointer(pointer)
                .unwrap_or_else(|| panic!("unresolved $ref {reference}"));
            resolve(doc, target)
        }
        None => schema,
    }
}

/// Properties and required names of an object schema, allOf merged.
fn object_parts(doc: &Value, schema: &Value) -> (serde_json::Map<String, Value>, Vec<String>) {
    let schema = resolve(doc, schema);
    let mut properties = serde_json::Map::new();
    let mut required = Vec::new();
    for part in schema["allOf"].as_array().into_iter().flatten() {
        let (p, r) = object_parts(doc, part);
        properties.extend(p);
        required.extend(r);
    }
    if let Some(p) = schema["properties"].as_object() {
        properties.extend(p.clone());
    }
    for r in schema["required"].as_array().into_iter().flatten() {
        required.push(r.as_str().expect("a required name").to_owned());
    }
    (properties, required)
}

/// Asserts that `value` conforms to `schema`, strictly: an object may hold only the
/// properties its schema declares (when it declares any).
fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) {
    let schema = resolve(doc, schema);
    if value.is_null() {
        let any = schema.get("type").is_none() && schema.get("allOf").is_none();
        assert!(
            any || schema["nullable"] == json!(true),
            "{at}: null where the schema does not allow it"
        );
        return;
    }
    let is_object = schema["type"] == json!("object") || schema.get("allOf").is_some();
    if is_object {
        let object = value
            .as_object()
            .unwrap_or_else(|| panic!("{at}: not an object: {value}"));
        let (properties, required) = object_parts(doc, schema);
        for name in &required {
            assert!(object.contains_key(name), "{at}: missing {name}: {value}");
        }
        if !properties.is_empty() {
            for (name, item) in object {
                let property = properties
                    .get(name)
                    .unwrap_or_else(|| panic!("{at}: {name} is not in the document"));
                conforms(doc, property, item, &format!("{at}.{name}"));
            }
        }
        return;
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("array") => {
            for (i, item) in value
                .as_array()
                .unwrap_or_else(|| panic!("{at}: not an array: {value}"))
                .iter()
                .enumerate()
            {
                conforms(doc, &schema["items"], item, &format!("{at}[{i}]"));
            }
        }
        Some("string") => {
            let text = value
                .as_str()
                .unwrap_or_else(|| panic!("{at}: not a string: {value}"));
            if schema["format"] == json!("date-time") {
                assert!(
                    humantime::parse_rfc3339(text).is_ok(),
                    "{at}: not RFC 3339: {text}"
                );
            }
        }
        Some("integer") => assert!(
            value.is_i64() || value.is_u64(),
            "{at}: not an integer: {value}"
        ),
        Some("number") => assert!(value.is_number(), "{at}: not a number: {value}"),
        Some("boolean") => assert!(value.is_boolean(), "{at}: not a boolean: {value}"),
        Some(other) => panic!("{at}: the checker does not know type {other}"),
        None => {}
    }
    if let Some(allowed) = schema["enum"].as_array() {
        assert!(
            allowed.contains(value),
            "{at}: {value} is not one of {allowed:?}"
        );
    }
}

/// Asserts that `value` is a `name` (a component schema) as the document describes it.
fn assert_schema(name: &str, value: &Value) {
    let doc = document();
    let schema = json!({ "$ref": format!("#/components/schemas/{name}") });
    conforms(&doc, &schema, value, name);
}

// ---------------------------------------------------------------------------------------
// The real binary serving the admin API
// ---------------------------------------------------------------------------------------

/// `outboxd run` against `db` with the admin API on a free loopback port and
/// `ADMIN_TOKEN` set to `token_env` exactly; returns the process and the API's base URL,
/// read from its log once it serves.
pub async fn start_binary_api(db: &TestDb, token_env: &str) -> (Spawned, String) {
    let mut command = outboxd_command();
    command
        .arg("run")
        .env("DATABASE_URL", &db.url)
        .env("ADMIN_ADDR", "127.0.0.1:0")
        .env("ADMIN_TOKEN", token_env)
        .env("LOG_FORMAT", "json")
        .env("WEBHOOK_POLL_INTERVAL_MS", "200");
    let outboxd = Spawned::start(command);
    let mut bound = None;
    eventually("the admin API serves", WAIT, || {
        bound = outboxd.stderr().lines().find_map(|line| {
            let line: Value = serde_json::from_str(line).ok()?;
            let fields = &line["fields"];
            let addr = fields["addr"].as_str()?;
            (fields["message"] == json!("serving the admin API") && !addr.ends_with(":0"))
                .then(|| addr.to_owned())
        });
        let found = bound.is_some();
        async move { found }
    })
    .await;
    let addr = bound.expect("the admin API's address");
    (outboxd, format!("http://{addr}"))
}

/// Stops a binary started by [`start_binary_api`]; asserts a clean exit.
pub async fn stop_binary(outboxd: Spawned) -> crate::harness::Finished {
    sigterm(outboxd.pid());
    let finished = outboxd.finish(Duration::from_secs(60)).await;
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    finished
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

/// The token is `ADMIN_TOKEN` without surrounding whitespace, for the length check and
/// for the comparison alike: a token file's final newline does not lock everyone out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_from_a_file_with_a_newline_is_accepted() {
    let db = TestDb::new("admin_token_trim").await;
    let http = reqwest::Client::new();
    for token_env in [format!("{TOKEN}\n"), format!("  {TOKEN}\r\n")] {
        let (outboxd, base) = start_binary_api(&db, &token_env).await;
        let ask = |authorization: String| {
            http.get(format!("{base}/v1/stats"))
                .header("authorization", authorization)
                .send()
        };
        let ok = ask(format!("Bearer {TOKEN}"))
            .await
            .expect("the API answers");
        assert_eq!(ok.status(), StatusCode::OK, "ADMIN_TOKEN={token_env:?}");
        for wrong in [
            format!("Bearer {TOKEN}x"),
            format!("Bearer {}", &TOKEN[1..]),
        ] {
            let refused = ask(wrong.clone()).await.expect("the API answers");
            assert_eq!(refused.status(), StatusCode::UNAUTHORIZED, "{wrong:?}");
        }
        let finished = stop_binary(outboxd).await;
        assert!(
            !finished.stderr.contains(TOKEN),
            "the token appears in the log:\n{}",
            finished.stderr
        );
    }

    // What is left after trimming must still be a usable token: exit 2, naming the variable.
    for token_env in [
        "  short-token \n".to_owned(),
        format!("{}\n\n\n\n\n\n\n\n\n\n\n\n", &TOKEN[..8]),
        "0123456789 abcdef 0123456789".to_owned(),
    ] {
        let mut command = outboxd_command();
        command
            .arg("run")
            .env("DATABASE_URL", &db.url)
            .env("ADMIN_ADDR", "127.0.0.1:0")
            .env("ADMIN_TOKEN", &token_env);
        let finished = run_to_end(command).await;
        assert_eq!(finished.code, Some(2), "{token_env:?}: {finished:?}");
        assert!(
            finished.stderr.contains("ADMIN_TOKEN"),
            "{token_env:?}: {}",
            finished.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_every_route_requires_the_token() {
    let db = TestDb::new("admin_auth").await;
    let api = Api::start(&db).await;
    let wrong = [
        None,
        Some("Bearer wrong-token".to_owned()),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
        Some(format!("Basic {TOKEN}")),
        Some(TOKEN.to_owned()),
        Some("Bearer".to_owned()),
        Some("Bearer ".to_owned()),
    ];
    let unknown: &[(&str, &str)] = &[
        ("GET", "/"),
        ("GET", "/v1"),
        ("GET", "/v1/nope"),
        ("GET", "/v1/endpoints/1/nope"),
        ("POST", "/admin"),
        ("PUT", "/v1/endpoints"),
        ("DELETE", "/v1/stats"),
    ];
    let mut refusals = HashSet::new();
    for &(m, path) in ROUTES.iter().chain(unknown) {
        for authorization in &wrong {
            let answer = api
                .send(
                    method(m),
                    &concrete(path),
                    authorization.as_deref(),
                    Some("application/json"),
                    Some("{}".to_owned()),
                )
                .await;
            assert!(
                answer
                    .headers
                    .get("www-authenticate")
                    .is_some_and(|v| v.to_str().unwrap().starts_with("Bearer")),
                "{m} {path}: {answer:?}"
            );
            refusals.insert(answer.raw.clone());
            answer.expect_error(StatusCode::UNAUTHORIZED, "unauthorized");
        }
    }
    assert_eq!(
        refusals.len(),
        1,
        "a refusal is the same for every path, existing or not: {refusals:?}"
    );

    // With the token, unknown paths and methods are JSON errors too.
    for &(m, path) in &unknown[..5] {
        api.call(method(m), path, None)
            .await
            .expect_error(StatusCode::NOT_FOUND, "not_found");
    }
    for &(m, path) in &unknown[5..] {
        api.call(method(m), path, None)
            .await
            .expect_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    }
    // ...and every route is served (any answer but "no such route" or "wrong method").
    for &(m, path) in ROUTES {
        let answer = api.call(method(m), &concrete(path), Some(json!({}))).await;
        assert_ne!(answer.status, StatusCode::UNAUTHORIZED, "{m} {path}");
        assert_ne!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{m} {path}");
        assert!(
            !answer.raw.contains("no such route"),
            "{m} {path} is not routed: {answer:?}"
        );
        assert!(!answer.status.is_server_error(), "{m} {path}: {answer:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_openapi_document_describes_exactly_the_routes() {
    let db = TestDb::new("admin_openapi").await;
    let api = Api::start(&db).await;
    let answer = api.get("/openapi.json").await;
    assert!(
        answer
            .headers
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap().starts_with("application/json"))
    );
    let served = answer.expect(StatusCode::OK);
    let on_disk: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"))
            .expect("read docs/openapi.json"),
    )
    .expect("docs/openapi.json is JSON");
    assert_eq!(served, on_disk, "the served document is docs/openapi.json");
    let doc = served;
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "an OpenAPI 3.x document: {}",
        doc["openapi"]
    );

    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (name, operation) in item.as_object().expect("a path item") {
            let m = name.to_ascii_uppercase();
            if ![
                "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE",
            ]
            .contains(&m.as_str())
            {
                continue;
            }
            documented.insert((m.clone(), path.clone()));
            let responses = operation["responses"].as_object().expect("responses");
            assert!(
                responses.contains_key("401"),
                "{m} {path} documents the 401"
            );
            // Every template parameter is declared as a path parameter.
            let declared: Vec<Value> = operation["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| resolve(&doc, p).clone())
                .filter(|p| p["in"] == json!("path"))
                .map(|p| p["name"].clone())
                .collect();
            for segment in path.split('/') {
                if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    assert!(
                        declared.contains(&json!(name)),
                        "{m} {path} declares its path parameter {name}"
                    );
                }
            }
        }
    }
    let routes: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    let undocumented: Vec<_> = routes.difference(&documented).collect();
    let not_routes: Vec<_> = documented.difference(&routes).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from the document: {undocumented:?}"
    );
    assert!(
        not_routes.is_empty(),
        "documented paths that are not routes: {not_routes:?}"
    );

    // The bearer scheme applies to everything.
    assert_eq!(
        doc["components"]["securitySchemes"]["bearerAuth"],
        json!({"type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearerAuth"]["description"]})
    );
    assert_eq!(doc["security"], json!([{"bearerAuth": []}]));

    // Every reference resolves.
    fn refs(doc: &Value, value: &Value) {
        match value {
            Value::Object(map) => {
                if map.contains_key("$ref") {
                    resolve(doc, value);
                }
                map.values().for_each(|v| refs(doc, v));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(doc, v)),
            _ => {}
        }
    }
    refs(&doc, &doc);

    // The error schema is the error shape.
    let refusal = api
        .send(Method::GET, "/v1/stats", None, None, None)
        .await
        .json;
    assert_schema("Error", &refusal);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_bad_input_is_a_json_400() {
    let db = TestDb::new("admin_bad_input").await;
    let api = Api::start(&db).await;
    let (endpoint_id, _) = api.add_endpoint("http://127.0.0.1:9/hook", &[], None).await;
    let ep = format!("/v1/endpoints/{endpoint_id}");

    // Bodies: (method, path, body, a word the message must contain).
    let long_type = "t".repeat(256);
    let bodies: Vec<(Method, String, Value, &str)> = vec![
        (
            Method::POST,
            "/v1/endpoints".into(),
            json!({"url": "not a url"}),
            "URL",
        ),
        (
            Method::POST,
            "/v1/endpoints".into(),
            json!({"url": "ftp://example.com/x"}),
            "scheme",
        ),
        (
            Method::POST,
            "/v1/endpoints".into(),
            json!({"url": "https://u:p@example.com/"}),
            "credentials",
        ),
        (
            Method::POST,
            "/v1/endpoints".into(),
            json!({"url": "https://example.com/", "secret": "not-a-secret"}),
            "whsec_",
        ),
        (
            Method::POST,
            "/v1/endpoints".into(),
            json!({"url": "https://example.com/", "secret": "whsec_c2hvcnQ="}),
            "24 to 64",
        ),
        (
            Method::POST,
            "/v1/endpoints".into(),
            json!({"url": "https://example.com/", "secret": "whsec_!!!"}),
            "base64",
        ),
        (
            Method::POST,
            "/v1/endpoints".into(),
            json!({"url": "https://example.com/", "event_types": ["order*"]}),
            "filter",
        ),
        (
            Method::POST,
            "/v1/endpoints".into(),
            json!({"url": "https://example.com/", "event_types": [""]}),
            "filter",
        ),
        (
            Method::POST,
            "/v1/endpoints".into(),
            json!({"url": "https://example.com/", "colour": "red"}),
            "colour",
        ),
        (
            Method::POST,
            "/v1/endpoints".into(),
            json!({"url": 5}),
            "url",
        ),
        (Method::POST, "/v1/endpoints".into(), json!({}), "url"),
        (Method::POST, "/v1/endpoints".into(), json!([]), "JSON"),
        (Method::PATCH, ep.clone(), json!({"url": "nope"}), "URL"),
        (
            Method::PATCH,
            ep.clone(),
            json!({"event_types": ["a b"]}),
            "filter",
        ),
        (
            Method::PATCH,
            ep.clone(),
            json!({"active": "yes"}),
            "active",
        ),
        (
            Method::PATCH,
            ep.clone(),
            json!({"secret": SECRET_A}),
            "secret",
        ),
        (
            Method::POST,
            format!("{ep}/rotate-secret"),
            json!({"secret": "whsec_short"}),
            "secret",
        ),
        (
            Method::POST,
            "/v1/events/1/replay".into(),
            json!({"endpoint_id": "x"}),
            "endpoint_id",
        ),
        (
            Method::POST,
            "/v1/dead/retry".into(),
            json!({"since": "yesterday"}),
            "since",
        ),
        (
            Method::POST,
            "/v1/dead/retry".into(),
            json!({"until": "2025-01-31T12:00:00"}),
            "until",
        ),
        (
            Method::POST,
            "/v1/dead/retry".into(),
            json!({"endpoint_id": "1"}),
            "endpoint_id",
        ),
        (
            Method::POST,
            "/v1/dead/retry".into(),
            json!({"event_type": long_type}),
            "event_type",
        ),
        (
            Method::POST,
            "/v1/dead/retry".into(),
            json!({"state": "dead"}),
            "state",
        ),
        // What the document forbids and the server once took: null for fields that are
        // not nullable, a body that is not an object, ids out of range, empty strings,
        // NUL (which PostgreSQL text cannot hold), URLs outside the documented grammar.
        (
            Method::POST,
            "/v1/events/1/replay".into(),
            json!({"endpoint_id": null}),
            "endpoint_id",
        ),
        (
            Method::POST,
            "/v1/events/1/replay".into(),
            json!({"endpoint_id": 0}),
            "endpoint_id",
        ),
        (
            Method::POST,
            "/v1/endpoints".into(),
            json!({"url": "https://example.com/", "event_types": null}),
            "event_types",
        ),
        (
            Method::POST,
            "/v1/endpoints".into(),
            json!({"url": "https://example.com/", "secret": null}),
            "secret",
        ),
        (
            Method::POST,
            "/v1/endpoints".into(),
            json!({"url": "https://example.com/", "description": "a\u{0}b"}),
            "NUL",
        ),
        (
            Method::POST,
            "/v1/endpoints".into(),
            json!({"url": "https://bücher.example/"}),
            "URL",
        ),
        (
            Method::POST,
            "/v1/endpoints".into(),
            json!({"url": "https://1.2.3.999/"}),
            "URL",
        ),
        (
            Method::POST,
            format!("{ep}/rotate-secret"),
            json!({"secret": null}),
            "secret",
        ),
        (Method::PATCH, ep.clone(), json!([null, null]), "object"),
        (
            Method::PATCH,
            ep.clone(),
            json!({"description": "x".repeat(1001)}),
            "description",
        ),
        (
            Method::PATCH,
            ep.clone(),
            json!({"event_types": vec!["a"; 101]}),
            "event_types",
        ),
        (Method::PATCH, ep.clone(), json!(null), "object"),
        (
            Method::PATCH,
            ep.clone(),
            json!({"description": "\u{0}"}),
            "NUL",
        ),
        (
            Method::POST,
            "/v1/dead/retry".into(),
            json!({"until": ""}),
            "until",
        ),
        (
            Method::POST,
            "/v1/dead/retry".into(),
            json!({"event_type": ""}),
            "event_type",
        ),
        (
            Method::POST,
            "/v1/dead/retry".into(),
            json!({"endpoint_id": null}),
            "endpoint_id",
        ),
        (
            Method::POST,
            "/v1/dead/retry".into(),
            json!({"endpoint_id": -3}),
            "endpoint_id",
        ),
    ];
    for (m, path, body, word) in bodies {
        let message = api
            .call(m.clone(), &path, Some(body.clone()))
            .await
            .expect_error(StatusCode::BAD_REQUEST, "invalid_input");
        assert!(
            message.contains(word),
            "{m} {path} {body}: the message should mention {word:?}: {message}"
        );
    }
    // A refused secret is not echoed back.
    let message = api
        .post(
            "/v1/endpoints",
            json!({"url": "https://example.com/", "secret": "whsec_TOPSECRETVALUE"}),
        )
        .await
        .expect_error(StatusCode::BAD_REQUEST, "invalid_input");
    assert!(!message.contains("TOPSECRETVALUE"), "{message}");

    // Malformed bodies, a missing body, a wrong content type.
    let bearer = format!("Bearer {TOKEN}");
    for (content_type, body) in [
        (Some("application/json"), Some("{")),
        (
            Some("application/json"),
            Some("{\"url\": \"https://example.com/\",}"),
        ),
        (Some("application/json"), Some("not json")),
        (Some("application/json"), Some("")),
        (None, None),
        (
            Some("text/plain"),
            Some("{\"url\": \"https://example.com/\"}"),
        ),
        (None, Some("{\"url\": \"https://example.com/\"}")),
    ] {
        for (m, path) in [
            (Method::POST, "/v1/endpoints".to_owned()),
            (Method::PATCH, ep.clone()),
            (Method::POST, "/v1/dead/retry".to_owned()),
        ] {
            api.send(
                m.clone(),
                &path,
                Some(&bearer),
                content_type,
                body.map(str::to_owned),
            )
            .await
            .expect_error(StatusCode::BAD_REQUEST, "invalid_input");
        }
    }
    // Optional bodies may be empty, but not malformed.
    api.send(
        Method::POST,
        &format!("{ep}/rotate-secret"),
        Some(&bearer),
        Some("application/json"),
        Some("{secret".to_owned()),
    )
    .await
    .expect_error(StatusCode::BAD_REQUEST, "invalid_input");
    // Too large.
    let huge = json!({"url": "https://example.com/", "description": "x".repeat(100_000)});
    api.post("/v1/endpoints", huge)
        .await
        .expect_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");

    // Query parameters and path ids.
    for (path, word) in [
        ("/v1/events?limit=0", "limit"),
        ("/v1/events?limit=100000", "limit"),
        ("/v1/events?limit=-1", "limit"),
        ("/v1/events?limit=ten", "limit"),
        ("/v1/events?limit=99999999999999", "limit"),
        ("/v1/events?limit=1&limit=2", "limit"),
        ("/v1/events?since=yesterday", "since"),
        ("/v1/events?since=2025-01-31", "since"),
        ("/v1/events?until=2025-01-31T12:00:00", "until"),
        ("/v1/events?until=", "until"),
        ("/v1/events?since=&limit=5", "since"),
        ("/v1/events?limit=", "limit"),
        ("/v1/events?event_type=", "event_type"),
        ("/v1/events?event_type=a%00b", "event_type"),
        ("/v1/events?after=0", "after"),
        ("/v1/events?limit=%2B5", "limit"),
        // An unencoded `+` is a space once decoded: not a date-time.
        ("/v1/events?since=2025-01-31T13:00:00+01:00", "%2B"),
        ("/v1/deliveries?state=", "state"),
        ("/v1/deliveries?endpoint_id=0", "endpoint_id"),
        ("/v1/deliveries?after=", "after"),
        ("/v1/endpoints?x=1", "x"),
        ("/v1/stats?verbose=true", "verbose"),
        ("/openapi.json?v=2", "v"),
        ("/v1/endpoints/0", "endpoint id"),
        ("/v1/endpoints/-1", "endpoint id"),
        ("/v1/endpoints/%2B1", "endpoint id"),
        ("/v1/events/9223372036854775808", "event id"),
        ("/v1/events?after=x", "after"),
        ("/v1/events?colour=red", "colour"),
        ("/v1/deliveries?state=bogus", "state"),
        ("/v1/deliveries?state=DEAD", "state"),
        ("/v1/deliveries?endpoint_id=x", "endpoint_id"),
        ("/v1/deliveries?after=5", "after"),
        ("/v1/deliveries?after=a:b", "after"),
        ("/v1/deliveries?limit=0", "limit"),
        ("/v1/deliveries?limit=100000", "limit"),
        ("/v1/deliveries?since=2025-13-01T00:00:00Z", "since"),
        ("/v1/deliveries?until=now", "until"),
        ("/v1/deliveries?page=2", "page"),
        ("/v1/deliveries/abc", "delivery id"),
        ("/v1/deliveries/1", "delivery id"),
        ("/v1/deliveries/1:2:3", "delivery id"),
        ("/v1/deliveries/1:x", "delivery id"),
        ("/v1/deliveries/-1:2", "delivery id"),
        ("/v1/deliveries/%201:2", "delivery id"),
        ("/v1/endpoints/abc", "endpoint id"),
        ("/v1/endpoints/1.5", "endpoint id"),
        ("/v1/events/abc", "event id"),
        ("/v1/events/99999999999999999999", "event id"),
    ] {
        let message = api
            .get(path)
            .await
            .expect_error(StatusCode::BAD_REQUEST, "invalid_input");
        assert!(
            message.contains(word),
            "GET {path}: the message should mention {word:?}: {message}"
        );
    }
    for path in [
        "/v1/deliveries/abc/retry",
        "/v1/deliveries/7/retry",
        "/v1/endpoints/x/test",
        "/v1/endpoints/x/rotate-secret",
        "/v1/events/x/replay",
    ] {
        api.post_empty(path)
            .await
            .expect_error(StatusCode::BAD_REQUEST, "invalid_input");
    }
    api.delete("/v1/endpoints/x")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "invalid_input");

    // What the document calls valid is taken: an empty window matches nothing, times
    // before 1970 and leap seconds are times, long event types count characters, a
    // delivery id past the id range names nothing.
    for path in [
        "/v1/events?since=2025-01-31T12:00:00Z&until=2025-01-31T12:00:00Z",
        "/v1/events?since=2025-02-01T00:00:00Z&until=2025-01-01T00:00:00Z",
        "/v1/deliveries?since=0464-11-16T22:15:01.2860-18:33",
        "/v1/deliveries?until=2016-12-31T23:59:60Z",
        "/v1/events?since=0000-01-01T00:00:00z&until=9999-12-31t23:59:59.999999999Z",
        "/v1/deliveries?after=99999999999999999999:1",
    ] {
        let page = api.get(path).await.expect(StatusCode::OK);
        assert!(page["items"].is_array(), "{path}: {page}");
    }
    let long_type = "é".repeat(255);
    api.get(&format!("/v1/events?event_type={}", "%C3%A9".repeat(255)))
        .await
        .expect(StatusCode::OK);
    let retried = api
        .post(
            "/v1/dead/retry",
            json!({"since": "2025-02-01T00:00:00Z", "until": "2025-01-01T00:00:00Z",
                   "event_type": long_type}),
        )
        .await
        .expect(StatusCode::ACCEPTED);
    assert_eq!(retried["retried"], json!(0));
    api.get("/v1/deliveries/99999999999999999999:1")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");

    // Nothing was created or changed by the refused requests.
    let list = api.get("/v1/endpoints").await.expect(StatusCode::OK);
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list["items"][0]["url"], json!("http://127.0.0.1:9/hook"));
    assert_eq!(list["items"][0]["event_types"], json!([]));
    assert_eq!(list["items"][0]["active"], json!(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_lists_paginate_newest_first() {
    let db = TestDb::new("admin_pages").await;
    let api = Api::start(&db).await;
    let (endpoint_id, _) = api.add_endpoint("http://127.0.0.1:9/hook", &[], None).await;
    let mut events = Vec::new();
    for n in 0..7 {
        let event_type = if n % 3 == 0 {
            "order.paid"
        } else {
            "order.created"
        };
        events.push(db.enqueue(event_type, &json!({ "n": n })).await);
    }
    fan_out_by_sql(&db, endpoint_id).await;
    db.client
        .execute(
            "UPDATE webhook_deliveries SET state = 'dead' WHERE event_id = ANY($1)",
            &[&vec![events[1], events[4]]],
        )
        .await
        .unwrap();
    // Those deaths were announced as operational events (sql/0010); only the test's own
    // events are paged here.
    db.client
        .batch_execute("DELETE FROM webhook_outbox WHERE event_type LIKE 'outboxd.%'")
        .await
        .unwrap();
    let newest_first: Vec<i64> = events.iter().rev().copied().collect();

    // Events: 3, 3, 1, newest first, no duplicates, cursors between pages only.
    let pages = api.pages("/v1/events", 3).await;
    let sizes: Vec<usize> = pages
        .iter()
        .map(|p| p["items"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [3, 3, 1]);
    for page in &pages {
        assert_schema("EventPage", page);
    }
    assert!(pages[0]["next_cursor"].is_string() && pages[1]["next_cursor"].is_string());
    assert_eq!(pages[2]["next_cursor"], Value::Null);
    let seen: Vec<i64> = pages
        .iter()
        .flat_map(ids)
        .map(|id| id.as_i64().unwrap())
        .collect();
    assert_eq!(seen, newest_first, "every event once, newest first");
    assert_eq!(pages[0]["items"][0]["payload"], json!({ "n": 6 }));

    // Deliveries likewise, with EVENT:ENDPOINT cursors.
    let pages = api.pages("/v1/deliveries", 3).await;
    let sizes: Vec<usize> = pages
        .iter()
        .map(|p| p["items"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [3, 3, 1]);
    for page in &pages {
        assert_schema("DeliveryPage", page);
    }
    let seen: Vec<Value> = pages.iter().flat_map(ids).collect();
    let expected: Vec<Value> = newest_first
        .iter()
        .map(|e| json!(format!("{e}:{endpoint_id}")))
        .collect();
    assert_eq!(seen, expected, "every delivery once, newest first");
    assert_eq!(
        pages[0]["next_cursor"],
        json!(format!("{}:{endpoint_id}", newest_first[2]))
    );

    // Filters.
    let paid = api
        .get("/v1/events?event_type=order.paid")
        .await
        .expect(StatusCode::OK);
    let paid_ids: Vec<Value> = [events[6], events[3], events[0]]
        .iter()
        .map(|e| json!(e))
        .collect();
    assert_eq!(ids(&paid), paid_ids);
    let dead = api
        .get(&format!(
            "/v1/deliveries?state=dead&endpoint_id={endpoint_id}"
        ))
        .await
        .expect(StatusCode::OK);
    let dead_ids: Vec<Value> = [events[4], events[1]]
        .iter()
        .map(|e| json!(format!("{e}:{endpoint_id}")))
        .collect();
    assert_eq!(ids(&dead), dead_ids);
    let pages = api.pages("/v1/deliveries?state=pending", 2).await;
    let seen: usize = pages
        .iter()
        .map(|p| p["items"].as_array().unwrap().len())
        .sum();
    assert_eq!(seen, 5);
    let other = api
        .get(&format!("/v1/deliveries?endpoint_id={}", endpoint_id + 1))
        .await
        .expect(StatusCode::OK);
    assert_eq!(other["items"], json!([]));
    assert_eq!(other["next_cursor"], Value::Null);
    // Time windows, with offsets.
    let hour_ago = humantime::format_rfc3339(SystemTime::now() - Duration::from_secs(3600));
    let in_an_hour = humantime::format_rfc3339(SystemTime::now() + Duration::from_secs(3600));
    let all = api
        .get(&format!(
            "/v1/events?since={hour_ago}&until={in_an_hour}&limit=1000"
        ))
        .await
        .expect(StatusCode::OK);
    assert_eq!(ids(&all).len(), 7);
    let none = api
        .get(&format!("/v1/deliveries?since={in_an_hour}"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(none["items"], json!([]));
    // 2000-01-01T02:00:00+02:00 is midnight UTC: everything is after it.
    let offset = api
        .get("/v1/events?since=2000-01-01T02:00:00%2B02:00&until=2000-01-01T00:00:01Z")
        .await
        .expect(StatusCode::OK);
    assert_eq!(offset["items"], json!([]));
    let plus = api
        .get(&format!(
            "/v1/events?since=2000-01-01T02:00:00%2B02:00&until={in_an_hour}"
        ))
        .await
        .expect(StatusCode::OK);
    assert_eq!(ids(&plus).len(), 7);

    // One of each, and the statistics.
    let event = api
        .get(&format!("/v1/events/{}", events[2]))
        .await
        .expect(StatusCode::OK);
    assert_schema("Event", &event);
    assert_eq!(event["payload"], json!({ "n": 2 }));
    let delivery = api
        .get(&format!("/v1/deliveries/{}%3A{endpoint_id}", events[2]))
        .await
        .expect(StatusCode::OK);
    assert_schema("DeliveryDetail", &delivery);
    assert_eq!(delivery["attempt_history"], json!([]));
    api.get("/v1/events/999999")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    api.get(&format!("/v1/deliveries/{}:{}", events[2], endpoint_id + 1))
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    let stats = api.get("/v1/stats").await.expect(StatusCode::OK);
    assert_schema("Stats", &stats);
    assert_eq!(stats["depth"]["pending"], json!(5));
    assert_eq!(stats["depth"]["dead"], json!(2));
    assert_eq!(stats["endpoints"][0]["endpoint_id"], json!(endpoint_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoint_lifecycle() {
    let db = TestDb::new("admin_endpoints").await;
    let api = Api::start(&db).await;

    let answer = api
        .post(
            "/v1/endpoints",
            json!({"url": "https://example.com/a", "event_types": ["order.*"], "description": "shop", "secret": SECRET_A}),
        )
        .await;
    let location = answer
        .headers
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned());
    let created = answer.expect(StatusCode::CREATED);
    assert_schema("CreatedEndpoint", &created);
    let id = created["id"].as_i64().unwrap();
    assert_eq!(location, Some(format!("/v1/endpoints/{id}")));
    assert_eq!(created["secret"], json!(SECRET_A));
    assert_eq!(created["url"], json!("https://example.com/a"));
    assert_eq!(created["event_types"], json!(["order.*"]));
    assert_eq!(created["description"], json!("shop"));
    assert_eq!(created["active"], json!(true));

    // A generated secret, and the minimal body.
    let other = api
        .post("/v1/endpoints", json!({"url": "https://example.com/b"}))
        .await
        .expect(StatusCode::CREATED);
    let generated = other["secret"].as_str().unwrap();
    assert!(generated.starts_with("whsec_") && generated != SECRET_A);
    assert_eq!(other["event_types"], json!([]));
    assert_eq!(other["description"], json!(""));

    // The secret is never shown again.
    let list = api.get("/v1/endpoints").await.expect(StatusCode::OK);
    assert_schema("EndpointList", &list);
    assert_eq!(ids(&list), [json!(id), other["id"].clone()]);
    let one = api
        .get(&format!("/v1/endpoints/{id}"))
        .await
        .expect(StatusCode::OK);
    assert_schema("Endpoint", &one);
    for shown in [list.to_string(), one.to_string()] {
        assert!(
            !shown.contains("secret\":") && !shown.contains(SECRET_A),
            "{shown}"
        );
        assert!(!shown.contains(generated));
    }

    // PATCH changes what it names and nothing else.
    let patched = api
        .patch(
            &format!("/v1/endpoints/{id}"),
            json!({"url": "https://example.com/a2", "event_types": ["*"], "description": null}),
        )
        .await
        .expect(StatusCode::OK);
    assert_schema("Endpoint", &patched);
    assert_eq!(patched["url"], json!("https://example.com/a2"));
    assert_eq!(patched["event_types"], json!(["*"]));
    assert_eq!(patched["description"], json!("shop"));
    let unchanged = api
        .patch(&format!("/v1/endpoints/{id}"), json!({}))
        .await
        .expect(StatusCode::OK);
    assert_eq!(unchanged["url"], patched["url"]);
    assert_eq!(unchanged["event_types"], patched["event_types"]);
    assert_eq!(unchanged["active"], json!(true));
    api.patch("/v1/endpoints/999999", json!({"description": "x"}))
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    api.get("/v1/endpoints/999999")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");

    // DELETE: 204, then gone everywhere.
    let deleted = api.delete(&format!("/v1/endpoints/{id}")).await;
    assert_eq!(deleted.raw, "", "204 has no body");
    deleted.expect(StatusCode::NO_CONTENT);
    api.get(&format!("/v1/endpoints/{id}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    api.delete(&format!("/v1/endpoints/{id}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    api.patch(&format!("/v1/endpoints/{id}"), json!({"active": true}))
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    api.post_empty(&format!("/v1/endpoints/{id}/rotate-secret"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    api.post_empty(&format!("/v1/endpoints/{id}/test"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    let list = api.get("/v1/endpoints").await.expect(StatusCode::OK);
    assert_eq!(ids(&list), [other["id"].clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_retry_redrives_dead_deliveries() {
    let db = TestDb::new("admin_redrive").await;
    let api = Api::start(&db).await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::status(400));
    receiver.always("/bulk", Reply::status(400));
    let (endpoint_id, secret) = api
        .add_endpoint(&receiver.url("/hook"), &["order.*"], None)
        .await;
    let (bulk_id, bulk_secret) = api
        .add_endpoint(&receiver.url("/bulk"), &["bulk.*"], None)
        .await;
    let dispatcher = RunningDispatcher::start(&db.url, test_config("admin_redrive"));

    // A 400 kills a delivery at once.
    let event_id = db.enqueue("order.created", &json!({"order": 1})).await;
    let bulk_events = [
        db.enqueue("bulk.one", &json!({"n": 1})).await,
        db.enqueue("bulk.two", &json!({"n": 2})).await,
    ];
    db.wait_all_in_state(3, "dead").await;
    let id = format!("{event_id}:{endpoint_id}");
    let dead = api
        .get(&format!("/v1/deliveries/{id}"))
        .await
        .expect(StatusCode::OK);
    assert_schema("DeliveryDetail", &dead);
    assert_eq!(dead["state"], json!("dead"));
    assert_eq!(dead["attempt_history"].as_array().map(Vec::len), Some(1));
    assert_eq!(dead["attempt_history"][0]["status_code"], json!(400));
    let first = receiver.requests_to("/hook");
    assert_eq!(first.len(), 1);

    // The receiver is fixed; the retry arrives with the same webhook-id.
    receiver.always("/hook", Reply::ok());
    let retried = api
        .post_empty(&format!("/v1/deliveries/{id}/retry"))
        .await
        .expect(StatusCode::ACCEPTED);
    assert_schema("DeliveryAccepted", &retried);
    assert_eq!(retried["delivery_id"], json!(id));
    eventually("the retry arrives", WAIT, || async {
        receiver.count_to("/hook") >= 2
    })
    .await;
    let again = receiver.requests_to("/hook");
    assert_eq!(again[1].webhook_id(), first[0].webhook_id());
    assert_eq!(again[1].webhook_id(), event_id.to_string());
    assert_eq!(again[1].body, first[0].body, "the same message");
    again[1]
        .verify(&secret)
        .expect("signed with the endpoint's secret");
    db.wait_until(&format!(
        "SELECT state = 'delivered' FROM webhook_deliveries
         WHERE event_id = {event_id} AND endpoint_id = {endpoint_id}"
    ))
    .await;
    let delivered = api
        .get(&format!("/v1/deliveries/{id}"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(delivered["state"], json!("delivered"));
    let history: Vec<Value> = delivered["attempt_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| json!([a["attempt"], a["status_code"]]))
        .collect();
    assert_eq!(history, [json!([1, 400]), json!([2, 200])]);

    // Only dead deliveries can be retried.
    let message = api
        .post_empty(&format!("/v1/deliveries/{id}/retry"))
        .await
        .expect_error(StatusCode::CONFLICT, "conflict");
    assert!(message.contains("delivered"), "{message}");
    api.post_empty("/v1/deliveries/999999:1/retry")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");

    // In bulk, by filter: only the matching dead deliveries.
    receiver.always("/bulk", Reply::ok());
    let none = api
        .post(
            "/v1/dead/retry",
            json!({"endpoint_id": bulk_id, "event_type": "bulk.three"}),
        )
        .await
        .expect(StatusCode::ACCEPTED);
    assert_eq!(none, json!({"retried": 0, "deliveries": []}));
    let since = humantime::format_rfc3339(SystemTime::now() - Duration::from_secs(600)).to_string();
    let bulk = api
        .post(
            "/v1/dead/retry",
            json!({"endpoint_id": bulk_id, "event_type": "bulk.one", "since": since}),
        )
        .await
        .expect(StatusCode::ACCEPTED);
    assert_schema("DeadRetried", &bulk);
    assert_eq!(
        bulk,
        json!({"retried": 1, "deliveries": [format!("{}:{bulk_id}", bulk_events[0])]})
    );
    let rest = api
        .post("/v1/dead/retry", json!({}))
        .await
        .expect(StatusCode::ACCEPTED);
    assert_eq!(
        rest,
        json!({"retried": 1, "deliveries": [format!("{}:{bulk_id}", bulk_events[1])]})
    );
    db.wait_all_in_state(3, "delivered").await;
    let bulk_requests = receiver.requests_to("/bulk");
    assert_eq!(bulk_requests.len(), 4, "two dead attempts, two re-driven");
    for event in bulk_events {
        let seen: Vec<_> = bulk_requests
            .iter()
            .filter(|r| r.event_id() == event)
            .collect();
        assert_eq!(
            seen.len(),
            2,
            "event {event}: the first try and the re-drive"
        );
        assert_eq!(seen[1].answered, Some(200));
        seen[1].verify(&bulk_secret).expect("signed");
    }
    dispatcher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_replay_redelivers_with_the_same_webhook_id() {
    let db = TestDb::new("admin_replay").await;
    let api = Api::start(&db).await;
    let receiver = Receiver::start().await;
    let (endpoint_id, secret) = api.add_endpoint(&receiver.url("/hook"), &[], None).await;
    let dispatcher = RunningDispatcher::start(&db.url, test_config("admin_replay"));
    let event_id = db.enqueue("order.created", &json!({"order": 7})).await;
    receiver.wait_for(1).await;
    db.wait_all_in_state(1, "delivered").await;

    // To every endpoint it went to (empty body).
    let replayed = api
        .post_empty(&format!("/v1/events/{event_id}/replay"))
        .await
        .expect(StatusCode::ACCEPTED);
    assert_schema("Replayed", &replayed);
    assert_eq!(
        replayed,
        json!({"deliveries": [format!("{event_id}:{endpoint_id}")]})
    );
    let requests = receiver.wait_for(2).await;
    assert_eq!(requests[1].webhook_id(), requests[0].webhook_id());
    assert_eq!(requests[1].event_id(), event_id);
    assert_eq!(requests[1].json()["data"], json!({"order": 7}));
    requests[1].verify(&secret).expect("signed");
    db.wait_all_in_state(1, "delivered").await;

    // To one endpoint, named.
    let replayed = api
        .post(
            &format!("/v1/events/{event_id}/replay"),
            json!({"endpoint_id": endpoint_id}),
        )
        .await
        .expect(StatusCode::ACCEPTED);
    assert_eq!(
        replayed,
        json!({"deliveries": [format!("{event_id}:{endpoint_id}")]})
    );
    let requests = receiver.wait_for(3).await;
    assert_eq!(requests[2].event_id(), event_id);
    db.wait_all_in_state(1, "delivered").await;

    // Unknown event or endpoint; an event not yet fanned out.
    api.post_empty("/v1/events/999999/replay")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    api.post(
        &format!("/v1/events/{event_id}/replay"),
        json!({"endpoint_id": endpoint_id + 100}),
    )
    .await
    .expect_error(StatusCode::NOT_FOUND, "not_found");
    let later = outboxd::enqueue(
        &db.client,
        &outboxd::NewEvent {
            deliver_after: Some(SystemTime::now() + Duration::from_secs(3600)),
            ..outboxd::NewEvent::new("order.created", &json!({}))
        },
    )
    .await
    .unwrap()
    .unwrap();
    api.post_empty(&format!("/v1/events/{later}/replay"))
        .await
        .expect_error(StatusCode::CONFLICT, "conflict");
    dispatcher.stop().await;
    assert_eq!(receiver.count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_test_event_arrives() {
    let db = TestDb::new("admin_test_event").await;
    let api = Api::start(&db).await;
    let receiver = Receiver::start().await;
    // Filters do not apply to test events.
    let (endpoint_id, secret) = api
        .add_endpoint(&receiver.url("/hook"), &["order.created"], None)
        .await;
    let dispatcher = RunningDispatcher::start(&db.url, test_config("admin_test_event"));

    let sent = api
        .post_empty(&format!("/v1/endpoints/{endpoint_id}/test"))
        .await
        .expect(StatusCode::ACCEPTED);
    assert_schema("DeliveryAccepted", &sent);
    let delivery_id = sent["delivery_id"].as_str().unwrap().to_owned();
    let (event, endpoint) = delivery_id.split_once(':').unwrap();
    assert_eq!(endpoint, endpoint_id.to_string());
    let requests = receiver.wait_for(1).await;
    assert_eq!(requests[0].webhook_id(), event);
    assert_eq!(requests[0].json()["type"], json!("outboxd.test"));
    requests[0].verify(&secret).expect("signed");
    db.wait_all_in_state(1, "delivered").await;
    let delivery = api
        .get(&format!("/v1/deliveries/{delivery_id}"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(delivery["state"], json!("delivered"));
    assert_eq!(delivery["event_type"], json!("outboxd.test"));

    // Not to a disabled endpoint, nor a missing one.
    api.patch(
        &format!("/v1/endpoints/{endpoint_id}"),
        json!({"active": false}),
    )
    .await
    .expect(StatusCode::OK);
    api.post_empty(&format!("/v1/endpoints/{endpoint_id}/test"))
        .await
        .expect_error(StatusCode::CONFLICT, "conflict");
    api.post_empty("/v1/endpoints/999999/test")
        .await
        .expect_error(StatusCode::NOT_FOUND, "not_found");
    dispatcher.stop().await;
    assert_eq!(receiver.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_rotation_signs_with_both_secrets_during_the_grace() {
    let db = TestDb::new("admin_rotation").await;
    let grace = Duration::from_secs(3600);
    let api = Api::with_grace(&db, grace).await;
    let receiver = Receiver::start().await;
    let (endpoint_id, old) = api
        .add_endpoint(&receiver.url("/hook"), &[], Some(SECRET_A))
        .await;
    assert_eq!(old, SECRET_A);

    let before = SystemTime::now();
    let rotated = api
        .post_empty(&format!("/v1/endpoints/{endpoint_id}/rotate-secret"))
        .await
        .expect(StatusCode::OK);
    assert_schema("RotatedSecret", &rotated);
    let new = rotated["secret"].as_str().unwrap().to_owned();
    assert!(new.starts_with("whsec_") && new != old);
    let expires = humantime::parse_rfc3339(
        rotated["previous_secret_expires_at"]
            .as_str()
            .expect("an expiry"),
    )
    .unwrap();
    assert!(
        expires >= before + grace - Duration::from_secs(60)
            && expires <= SystemTime::now() + grace + Duration::from_secs(60),
        "the old secret signs for the grace period"
    );
    let endpoint = api
        .get(&format!("/v1/endpoints/{endpoint_id}"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(
        endpoint["previous_secret_expires_at"],
        rotated["previous_secret_expires_at"]
    );

    let dispatcher = RunningDispatcher::start(&db.url, test_config("admin_rotation"));
    for n in 0..3 {
        db.enqueue("order.created", &json!({ "n": n })).await;
    }
    let requests = receiver.wait_for(3).await;
    for request in &requests {
        let entries: Vec<&str> = request.header("webhook-signature").split(' ').collect();
        assert_eq!(entries.len(), 2, "one v1 entry per secret: {entries:?}");
        assert!(entries.iter().all(|e| e.starts_with("v1,")), "{entries:?}");
        request
            .verify(&old)
            .expect("verifies with the old secret alone");
        request
            .verify(&new)
            .expect("verifies with the new secret alone");
        assert!(
            request.verify(SECRET_B).is_err(),
            "another secret does not verify"
        );
    }

    // A rotation to a given secret; the secret it replaces (`new`) is now the old one.
    let rotated = api
        .post(
            &format!("/v1/endpoints/{endpoint_id}/rotate-secret"),
            json!({"secret": SECRET_B}),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(rotated["secret"], json!(SECRET_B));
    db.enqueue("order.created", &json!({ "n": 3 })).await;
    let requests = receiver.wait_for(4).await;
    requests[3].verify(SECRET_B).expect("the newest secret");
    requests[3].verify(&new).expect("the one it replaced");

    // With no grace period the old secret stops signing at once.
    let no_grace = Api::with_grace(&db, Duration::ZERO).await;
    let rotated = no_grace
        .post_empty(&format!("/v1/endpoints/{endpoint_id}/rotate-secret"))
        .await
        .expect(StatusCode::OK);
    assert_schema("RotatedSecret", &rotated);
    assert_eq!(rotated["previous_secret_expires_at"], Value::Null);
    let latest = rotated["secret"].as_str().unwrap().to_owned();
    db.enqueue("order.created", &json!({ "n": 4 })).await;
    let requests = receiver.wait_for(5).await;
    assert_eq!(
        requests[4].header("webhook-signature").split(' ').count(),
        1
    );
    requests[4].verify(&latest).expect("the new secret");
    assert!(
        requests[4].verify(SECRET_B).is_err(),
        "the old one no longer signs"
    );
    dispatcher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_patch_active_parks_and_resumes() {
    let db = TestDb::new("admin_park").await;
    let api = Api::start(&db).await;
    let receiver = Receiver::start().await;
    let (endpoint_id, secret) = api.add_endpoint(&receiver.url("/hook"), &[], None).await;
    let mut events = Vec::new();
    for n in 0..3 {
        events.push(db.enqueue("order.created", &json!({ "n": n })).await);
    }
    fan_out_by_sql(&db, endpoint_id).await;
    let of_endpoint = format!("/v1/deliveries?endpoint_id={endpoint_id}");
    let pending = api
        .get(&format!("{of_endpoint}&state=pending"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(ids(&pending).len(), 3);

    // Disabled: every pending delivery is parked.
    let disabled = api
        .patch(
            &format!("/v1/endpoints/{endpoint_id}"),
            json!({"active": false}),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(disabled["active"], json!(false));
    assert!(disabled["disabled_reason"].is_string(), "{disabled}");
    let parked = api
        .get(&format!("{of_endpoint}&state=parked"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(ids(&parked).len(), 3, "{parked}");
    let stats = api.get("/v1/stats").await.expect(StatusCode::OK);
    assert_eq!(stats["depth"]["parked"], json!(3));
    assert_eq!(stats["endpoints"][0]["active"], json!(false));

    // A dispatcher sends nothing while the endpoint is disabled...
    let dispatcher = RunningDispatcher::start(&db.url, test_config("admin_park"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.count(), 0, "parked deliveries are not sent");

    // ...and everything once it is enabled again.
    let enabled = api
        .patch(
            &format!("/v1/endpoints/{endpoint_id}"),
            json!({"active": true}),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(enabled["active"], json!(true));
    assert_eq!(enabled["disabled_reason"], Value::Null);
    let requests = receiver.wait_for(3).await;
    let mut arrived: Vec<i64> = requests.iter().map(|r| r.event_id()).collect();
    arrived.sort_unstable();
    assert_eq!(arrived, events);
    for request in &requests {
        request.verify(&secret).expect("signed");
    }
    db.wait_all_in_state(3, "delivered").await;
    let delivered = api
        .get(&format!("{of_endpoint}&state=delivered"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(ids(&delivered).len(), 3);
    dispatcher.stop().await;
}
