//! The OpenAPI document and the offline Swagger UI: every annotated route is documented, every
//! reference resolves, and the document parses as OpenAPI 3.1.

mod common;

use std::collections::BTreeSet;

use common::Node;
use reqwest::Method;
use serde_json::{Value, json};

/// Resolves a local `$ref` (`#/components/...`) in `doc`.
fn resolve<'a>(doc: &'a Value, reference: &str) -> Option<&'a Value> {
    doc.pointer(reference.strip_prefix('#')?)
}

fn walk_refs(doc: &Value, v: &Value, bad: &mut Vec<String>, count: &mut usize) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                if k == "$ref" {
                    *count += 1;
                    let r = child.as_str().unwrap_or_default();
                    if resolve(doc, r).is_none() {
                        bad.push(r.to_string());
                    }
                } else {
                    walk_refs(doc, child, bad, count);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|c| walk_refs(doc, c, bad, count)),
        _ => {}
    }
}

fn any_value_as_null(v: Value) -> Value {
    match v {
        Value::Object(map) if map.is_empty() => json!({"type": null}),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    // Only schema positions: `{}` elsewhere (e.g. security scopes) stays.
                    let schema_position =
                        k == "schema" || k == "items" || k == "additionalProperties";
                    let nested = v.as_object().is_some_and(|m| !m.is_empty());
                    if k == "properties"
                        && let Value::Object(props) = v
                    {
                        // Each property's value is a schema (`{}` for any JSON value).
                        let props = props
                            .into_iter()
                            .map(|(name, schema)| {
                                (name, any_value_as_null(untyped_as_null(schema)))
                            })
                            .collect();
                        (k, Value::Object(props))
                    } else if schema_position || nested {
                        (k, any_value_as_null(v))
                    } else {
                        (k, v)
                    }
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(any_value_as_null).collect()),
        other => other,
    }
}

/// A property schema that only describes (any JSON value, with a doc comment) gets the
/// `"type": null` utoipa reads back.
fn untyped_as_null(v: Value) -> Value {
    match v {
        Value::Object(mut map)
            if !["type", "$ref", "allOf", "oneOf", "anyOf"]
                .iter()
                .any(|k| map.contains_key(*k)) =>
        {
            map.insert("type".into(), Value::Null);
            Value::Object(map)
        }
        other => other,
    }
}

/// `(METHOD, /path)` of every `#[utoipa::path]` annotation in the route sources.
fn annotated_routes() -> BTreeSet<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/routes");
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for chunk in text.split("#[utoipa::path(").skip(1) {
            let method = chunk.split(',').next().unwrap().trim().to_uppercase();
            let path = chunk
                .split("path = \"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .expect("path in annotation");
            out.insert((method, path.to_string()));
        }
    }
    out
}

#[tokio::test]
async fn openapi_document_is_valid_and_complete() {
    let node = Node::start().await;
    let (status, doc) = node.call(Method::GET, "/api-docs", None, None).await;
    assert_eq!(status, 200);
    // It parses as an OpenAPI document, version 3.1.
    // (utoipa writes "any value" as the empty schema `{}`, valid JSON Schema, but reads it back
    // only as `{"type": null}`: normalized for the parse.)
    let parsed: utoipa::openapi::OpenApi =
        serde_json::from_value(any_value_as_null(doc.clone())).expect("a utoipa OpenApi");
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "{}",
        doc["openapi"]
    );
    assert!(!parsed.paths.paths.is_empty());

    // Every $ref resolves.
    let (mut bad, mut count) = (Vec::new(), 0);
    walk_refs(&doc, &doc, &mut bad, &mut count);
    assert!(count > 0);
    assert!(bad.is_empty(), "unresolved $refs: {bad:?}");

    // The three token kinds are security schemes, and operations only name those.
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    for s in ["userToken", "identityToken", "connectionToken"] {
        assert!(schemes.contains_key(s), "security scheme {s}");
    }
    let mut documented = BTreeSet::new();
    let public = ["/api/auth", "/healthz", "/.well-known/jwks.json"];
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if !["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                continue;
            }
            documented.insert((method.to_uppercase(), path.clone()));
            let responses = op["responses"].as_object().expect("responses");
            assert!(
                responses.keys().any(|c| c.starts_with('2') || c == "101"),
                "{method} {path} documents no success"
            );
            let security = op["security"].as_array();
            match security {
                Some(list) => {
                    for req in list {
                        for name in req.as_object().unwrap().keys() {
                            assert!(schemes.contains_key(name), "{method} {path}: {name}");
                        }
                    }
                }
                None => assert!(
                    public.contains(&path.as_str()),
                    "{method} {path} names no security scheme"
                ),
            }
            assert!(op["tags"].is_array(), "{method} {path} has no tag");
        }
    }
    assert!(documented.contains(&("GET".into(), "/api/core/connection/events".into())));

    // Every annotated handler is in the document.
    let annotated = annotated_routes();
    assert_eq!(
        annotated, documented,
        "annotated routes vs documented operations"
    );

    // The only routes outside the OpenAPI router are the declared non-API ones, all in ui.rs.
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![src];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let plain = text.matches(".route(").count() + text.matches(".route_service(").count();
            if path.ends_with("routes/ui.rs") {
                assert_eq!(
                    plain,
                    morrigan_server::testing::UNDOCUMENTED.len(),
                    "every route in ui.rs is listed in UNDOCUMENTED"
                );
            } else {
                assert_eq!(
                    plain,
                    0,
                    "{} adds a route outside the OpenAPI router",
                    path.display()
                );
            }
        }
    }

    // Every documented operation is served (not the router's fallback, not 405).
    for (method, path) in &documented {
        let concrete = path
            .replace("{id}", "no-such-id")
            .replace("{clientId}", "no-such-client");
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        // Status only: the body of a stream (events) never ends.
        let res = node
            .http
            .request(m, node.url(&concrete))
            .bearer_auth(&node.admin)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        let body = if status == 404 {
            res.json::<Value>().await.unwrap_or_default()
        } else {
            Value::Null
        };
        assert_ne!(status, 405, "{method} {path}");
        assert!(
            !(status == 404 && body["reason"] == "No such route."),
            "{method} {path} is documented but not served"
        );
    }
    // And every declared non-API route is served.
    for path in morrigan_server::testing::UNDOCUMENTED {
        let concrete = path
            .replace("{*file}", "swagger-ui.css")
            .replace("{file}", "app.js");
        let res = node.http.get(node.url(&concrete)).send().await.unwrap();
        assert_eq!(res.status().as_u16(), 200, "{path}");
    }
    // An unknown route is the fallback.
    let (status, body) = node.call(Method::GET, "/api/nope", None, None).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (404, Some("No such route."))
    );
}

#[tokio::test]
async fn swagger_ui_is_served_offline() {
    let node = Node::start().await;
    let res = node
        .http
        .get(node.url("/api-docs/view"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = res.text().await.unwrap();
    assert!(html.contains("swagger"), "{html}");
    assert!(!html.contains("https://"), "no external resources: {html}");
    // Every local asset the page links resolves.
    let mut assets = 0;
    for attr in ["href=\"", "src=\""] {
        for rest in html.split(attr).skip(1) {
            let link = rest.split('"').next().unwrap();
            if link.starts_with("view/") {
                assets += 1;
                let res = node
                    .http
                    .get(node.url(&format!("/api-docs/{link}")))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status().as_u16(), 200, "{link}");
            }
        }
    }
    assert!(assets >= 3, "{html}");
    let init = node
        .http
        .get(node.url("/api-docs/view/swagger-initializer.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(init.contains("\"/api-docs\""), "{init}");
}

#[tokio::test]
async fn tracked_messaging_routes_and_parameters_are_documented() {
    let node = Node::start().await;
    let (status, doc) = node.call(Method::GET, "/api-docs", None, None).await;
    assert_eq!(status, 200);
    let params = |path: &str, method: &str| -> Vec<String> {
        doc["paths"][path][method]["parameters"]
            .as_array()
            .unwrap_or_else(|| panic!("{method} {path} is documented with parameters"))
            .iter()
            .map(|p| {
                format!(
                    "{}:{}",
                    p["in"].as_str().unwrap(),
                    p["name"].as_str().unwrap()
                )
            })
            .collect()
    };
    let client_send = params("/api/core/client/{clientId}/send", "post");
    for p in [
        "query:track",
        "query:ttl",
        "query:timeout",
        "header:Idempotency-Key",
    ] {
        assert!(
            client_send.contains(&p.to_string()),
            "{p} in {client_send:?}"
        );
    }
    let connection_send = params("/api/core/connection/{id}/send", "post");
    for p in ["query:track", "query:timeout"] {
        assert!(
            connection_send.contains(&p.to_string()),
            "{p} in {connection_send:?}"
        );
    }
    let responses = &doc["paths"]["/api/core/client/{clientId}/send"]["post"]["responses"];
    for code in ["200", "202", "409", "422", "429", "504"] {
        assert!(
            responses.get(code).is_some(),
            "client send documents {code}"
        );
    }
    assert!(doc["paths"]["/api/core/message/{id}"]["get"].is_object());
    let list = params("/api/core/client/{clientId}/messages", "get");
    for p in ["query:direction", "query:state", "query:limit"] {
        assert!(list.contains(&p.to_string()), "{p} in {list:?}");
    }
    for schema in [
        "MessageRecord",
        "SendResult",
        "MessageList",
        "MessageResponse",
    ] {
        assert!(doc["components"]["schemas"][schema].is_object(), "{schema}");
    }
}
