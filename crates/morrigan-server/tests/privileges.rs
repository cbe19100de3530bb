//! No privilege escalation: an identity creates or changes only identities whose functions it
//! holds itself, and grants only functions it holds (403 naming the ones it lacks); the last
//! identity holding every function can be neither deleted nor stripped (409), even by two
//! full identities deleting each other at once (SQLite and, with `MORRIGAN_TEST_POSTGRES_URL`,
//! PostgreSQL); and every function-bearing route of the OpenAPI document answers 403 without
//! its functions and serves with them.

mod common;

use std::collections::{BTreeSet, HashMap};

use common::{ADMIN_PASSWORD, Node};
use morrigan_protocol::functions::{self, ALL};
use reqwest::Method;
use serde_json::{Value, json};

/// Asserts 403 `forbidden` whose reason names every function in `missing`.
fn assert_forbidden_naming(status: u16, body: &Value, missing: &[&str], what: &str) {
    assert_eq!(status, 403, "{what}: {body}");
    assert_eq!(body["state"], "forbidden", "{what}: {body}");
    assert_eq!(body["status"], "failed", "{what}: {body}");
    let reason = body["reason"].as_str().unwrap_or_default();
    for f in missing {
        assert!(
            reason.contains(&format!("'{f}'")),
            "{what}: the reason names '{f}': {reason}"
        );
    }
}

fn assert_last_full(status: u16, body: &Value, what: &str) {
    assert_eq!(status, 409, "{what}: {body}");
    assert_eq!(body["state"], "conflict", "{what}: {body}");
    assert_eq!(body["status"], "failed", "{what}: {body}");
    assert!(body["reason"].is_string(), "{what}: {body}");
}

/// Every function but `except`.
fn all_but(except: &[&str]) -> Vec<&'static str> {
    ALL.iter()
        .copied()
        .filter(|f| !except.contains(f))
        .collect()
}

/// The identities as the admin lists them: name → functions.
async fn identities(node: &Node, token: &str) -> HashMap<String, BTreeSet<String>> {
    let (status, body) = node.get("/api/auth/identity", token).await;
    assert_eq!(status, 200, "{body}");
    body["identities"]
        .as_array()
        .expect("identities")
        .iter()
        .map(|i| {
            let functions = i["functions"]
                .as_array()
                .expect("functions")
                .iter()
                .map(|f| f.as_str().expect("function").to_string())
                .collect();
            (i["name"].as_str().expect("name").to_string(), functions)
        })
        .collect()
}

fn is_full(functions: &BTreeSet<String>) -> bool {
    ALL.iter().all(|f| functions.contains(*f))
}

fn new_identity(name: &str, functions: &[&str]) -> Value {
    json!({"name": name, "auth": {"type": "password", "password": format!("password-of-{name}")}, "functions": functions})
}

#[tokio::test]
async fn creating_an_identity_grants_only_functions_the_creator_holds() {
    let node = Node::start().await;
    let (_, creator) = node
        .identity_with("creator", &[functions::IDENTITY_CREATE])
        .await;

    let (status, body) = node
        .post(
            "/api/auth/identity",
            &creator,
            &new_identity("escalated", ALL),
        )
        .await;
    assert_forbidden_naming(
        status,
        &body,
        &all_but(&[functions::IDENTITY_CREATE]),
        "create with every function",
    );
    let (status, body) = node
        .post(
            "/api/auth/identity",
            &creator,
            &new_identity("escalated", &[functions::API]),
        )
        .await;
    assert_forbidden_naming(status, &body, &[functions::API], "create with api");
    let (status, body) = node.try_login("escalated", "password-of-escalated").await;
    assert_eq!(status, 403, "no such identity was created: {body}");

    // What it holds, or less, it may give.
    for (name, functions) in [
        ("peer", &[functions::IDENTITY_CREATE][..]),
        ("plain", &[][..]),
    ] {
        let (status, body) = node
            .post(
                "/api/auth/identity",
                &creator,
                &new_identity(name, functions),
            )
            .await;
        assert_eq!(status, 200, "create {name}: {body}");
    }
    let list = identities(&node, &node.admin).await;
    assert!(!list.contains_key("escalated"), "{list:?}");
    assert_eq!(
        list["peer"],
        BTreeSet::from(["auth.identity.create".into()])
    );
}

#[tokio::test]
async fn nobody_grants_themselves_or_others_functions_they_do_not_hold() {
    let node = Node::start().await;
    let (updater_id, updater) = node
        .identity_with("updater", &[functions::IDENTITY_UPDATE_ALL])
        .await;
    let (plain_id, _) = node.identity_with("plain", &[]).await;
    let (_, me) = node.get("/api/auth/identity/me", &node.admin).await;
    let admin_id = me["identity"]["id"].as_str().expect("admin id").to_string();

    // Itself: through its id, and through `me`.
    let (status, body) = node
        .patch(
            &format!("/api/auth/identity/{updater_id}"),
            &updater,
            &json!({"functions": ALL}),
        )
        .await;
    assert_forbidden_naming(
        status,
        &body,
        &all_but(&[functions::IDENTITY_UPDATE_ALL]),
        "self-grant by id",
    );
    let (status, body) = node
        .patch(
            "/api/auth/identity/me",
            &updater,
            &json!({"functions": [functions::IDENTITY_UPDATE_ALL, functions::API]}),
        )
        .await;
    assert_eq!(status, 403, "self-grant through me: {body}");
    let (_, me) = node.get("/api/auth/identity/me", &updater).await;
    assert_eq!(
        me["identity"]["functions"],
        json!(["auth.identity.update.all"])
    );

    // Another identity: only functions the caller holds.
    let plain = format!("/api/auth/identity/{plain_id}");
    let (status, body) = node
        .patch(&plain, &updater, &json!({"functions": [functions::API]}))
        .await;
    assert_forbidden_naming(status, &body, &[functions::API], "grant api to another");
    let (status, body) = node
        .patch(
            &plain,
            &updater,
            &json!({"functions": [functions::IDENTITY_UPDATE_ALL]}),
        )
        .await;
    assert_eq!(status, 200, "grant a function it holds: {body}");

    // A more privileged identity is out of reach: no password reset, no stripping.
    let admin = format!("/api/auth/identity/{admin_id}");
    let (status, body) = node
        .patch(
            &admin,
            &updater,
            &json!({"auth": {"type": "password", "password": "taken-over-1"}}),
        )
        .await;
    assert_forbidden_naming(
        status,
        &body,
        &[functions::API],
        "reset a more privileged password",
    );
    let (status, body) = node
        .patch(&admin, &updater, &json!({"functions": []}))
        .await;
    assert_eq!(status, 403, "strip a more privileged identity: {body}");
    assert_eq!(node.try_login("admin", "taken-over-1").await.0, 403);
    node.login("admin", ADMIN_PASSWORD).await;
    let (_, deleter) = node
        .identity_with("deleter", &[functions::IDENTITY_DELETE_ALL])
        .await;
    let (status, body) = node.delete(&admin, &deleter).await;
    assert_forbidden_naming(status, &body, &[functions::API], "delete a more privileged");
    let list = identities(&node, &node.admin).await;
    assert!(is_full(&list["admin"]), "{list:?}");

    // Giving up a function of one's own is allowed.
    let (status, body) = node
        .patch(
            &format!("/api/auth/identity/{updater_id}"),
            &updater,
            &json!({"functions": []}),
        )
        .await;
    assert_eq!(status, 200, "drop its own function: {body}");
}

/// Two full identities delete each other at once, `rounds` times: each time exactly one
/// delete succeeds and one full identity remains.
async fn mutual_deletes(node: &Node, rounds: usize) {
    let mut survivor = (
        "admin".to_string(),
        ADMIN_PASSWORD.to_string(),
        node.admin.clone(),
    );
    for round in 0..rounds {
        let twin = format!("twin-{round}");
        let (status, body) = node
            .post("/api/auth/identity", &survivor.2, &new_identity(&twin, ALL))
            .await;
        assert_eq!(status, 200, "create {twin}: {body}");
        let twin_id = body["identity"]["id"].as_str().expect("id").to_string();
        let twin_password = format!("password-of-{twin}");
        let twin_token = node.login(&twin, &twin_password).await;
        let (_, me) = node.get("/api/auth/identity/me", &survivor.2).await;
        let survivor_id = me["identity"]["id"].as_str().expect("id").to_string();

        let (twin_path, survivor_path) = (
            format!("/api/auth/identity/{twin_id}"),
            format!("/api/auth/identity/{survivor_id}"),
        );
        let (a, b) = tokio::join!(
            node.delete(&twin_path, &survivor.2),
            node.delete(&survivor_path, &twin_token),
        );
        let ok = [a.0, b.0].iter().filter(|s| **s == 200).count();
        assert_eq!(
            ok, 1,
            "round {round}: exactly one delete succeeds: {a:?} {b:?}"
        );
        for (status, body) in [&a, &b] {
            // The loser is refused by the guard (409), or, if the winner's delete came
            // first, no longer exists (401).
            assert!(
                [200, 401, 409].contains(status),
                "round {round}: {status} {body}"
            );
        }
        if b.0 == 200 {
            survivor = (twin, twin_password, twin_token);
        }
        let list = identities(node, &survivor.2).await;
        let full: Vec<_> = list.iter().filter(|(_, f)| is_full(f)).collect();
        assert_eq!(
            full.len(),
            1,
            "round {round}: one full identity left: {list:?}"
        );
    }
    let _ = node.login(&survivor.0, &survivor.1).await;
}

#[tokio::test]
async fn the_last_identity_holding_every_function_cannot_be_deleted_or_stripped() {
    let node = Node::start().await;
    let (_, me) = node.get("/api/auth/identity/me", &node.admin).await;
    let admin = format!(
        "/api/auth/identity/{}",
        me["identity"]["id"].as_str().expect("id")
    );
    let (status, body) = node.delete(&admin, &node.admin).await;
    assert_last_full(status, &body, "delete the last full identity");
    let (status, body) = node
        .patch(
            &admin,
            &node.admin,
            &json!({"functions": all_but(&[functions::API])}),
        )
        .await;
    assert_last_full(status, &body, "strip the last full identity");
    // Its name and password may change.
    let (status, body) = node
        .patch(&admin, &node.admin, &json!({"name": "root"}))
        .await;
    assert_eq!(status, 200, "rename: {body}");
    let (status, body) = node
        .patch(&admin, &node.admin, &json!({"name": "admin"}))
        .await;
    assert_eq!(status, 200, "rename back: {body}");

    // With a second full identity, either may go, but not both.
    let (_, twin) = node.identity_with("twin", ALL).await;
    let (status, body) = node
        .patch(&admin, &twin, &json!({"functions": [functions::API]}))
        .await;
    assert_eq!(status, 200, "strip one of two full identities: {body}");
    let (_, twin_me) = node.get("/api/auth/identity/me", &twin).await;
    let twin_path = format!(
        "/api/auth/identity/{}",
        twin_me["identity"]["id"].as_str().expect("id")
    );
    let (status, body) = node.delete(&twin_path, &twin).await;
    assert_last_full(status, &body, "delete the new last full identity");
    let (status, body) = node.patch(&admin, &twin, &json!({"functions": ALL})).await;
    assert_eq!(status, 200, "restore: {body}");
    let (status, body) = node.delete(&twin_path, &node.admin).await;
    assert_eq!(status, 200, "delete one of two full identities: {body}");

    mutual_deletes(&node, 6).await;
}

#[tokio::test]
async fn the_last_full_identity_survives_concurrent_deletes_on_postgres() {
    let Some(base) = common::service_url("MORRIGAN_TEST_POSTGRES_URL") else {
        return;
    };
    let database = common::pg::Database::create(&base, "privileges").await;
    let db = database.url.clone();
    let node = Node::start_with(|c| c.database_url = Some(db)).await;
    mutual_deletes(&node, 6).await;
    let _ = node.stop().await;
    database.drop_now().await;
}

/// A function-bearing route: method, OpenAPI path, the functions it requires, a body.
struct Route {
    method: Method,
    path: &'static str,
    requires: &'static [&'static str],
    body: Option<Value>,
}

fn route(method: Method, path: &'static str, requires: &'static [&'static str]) -> Route {
    Route {
        method,
        path,
        requires,
        body: None,
    }
}

/// Every route that takes a user token, with what it requires.
fn table() -> Vec<Route> {
    use functions::*;
    let with = |r: Route, body: Value| Route {
        body: Some(body),
        ..r
    };
    vec![
        route(Method::GET, "/api/auth/identity", &[IDENTITY_GET_ALL]),
        with(
            route(Method::POST, "/api/auth/identity", &[IDENTITY_CREATE]),
            json!({"name": "{name}", "auth": {"password": "long-enough"}}),
        ),
        route(Method::GET, "/api/auth/identity/me", &[]),
        with(
            route(Method::PATCH, "/api/auth/identity/me", &[]),
            json!({"name": "{name}"}),
        ),
        route(Method::GET, "/api/auth/identity/{id}", &[IDENTITY_GET_ALL]),
        with(
            route(
                Method::PATCH,
                "/api/auth/identity/{id}",
                &[IDENTITY_UPDATE_ALL],
            ),
            json!({"name": "{name}"}),
        ),
        route(
            Method::DELETE,
            "/api/auth/identity/{id}",
            &[IDENTITY_DELETE_ALL],
        ),
        with(
            route(Method::POST, "/api/core/client/provision", &[API]),
            json!({"id": "dev"}),
        ),
        route(Method::GET, "/api/core/client", &[API]),
        route(Method::GET, "/api/core/client/{clientId}", &[API]),
        route(Method::DELETE, "/api/core/client/{clientId}", &[API]),
        route(Method::GET, "/api/core/connection", &[API]),
        route(Method::GET, "/api/core/connection/events", &[API]),
        route(Method::GET, "/api/core/connection/{id}", &[API]),
        with(
            route(
                Method::POST,
                "/api/core/connection/{id}/send",
                &[API, CONNECTION_SEND],
            ),
            json!({"type": "a.b"}),
        ),
        route(
            Method::DELETE,
            "/api/core/connection/{id}",
            &[API, CONNECTION_CLOSE],
        ),
        with(
            route(
                Method::POST,
                "/api/core/client/{clientId}/send",
                &[API, CONNECTION_SEND],
            ),
            json!({"type": "a.b"}),
        ),
        route(
            Method::GET,
            "/api/core/client/{clientId}/messages",
            &[API, CONNECTION],
        ),
        route(Method::GET, "/api/core/message/{id}", &[API, CONNECTION]),
        route(Method::GET, "/api/core/capability", &[API]),
        route(Method::GET, "/api/core/capability/{clientId}", &[API]),
        route(Method::GET, "/api/core/node", &[API]),
    ]
}

/// Status and body of a request; an event stream's body is not read (it does not end).
async fn status_of(
    node: &Node,
    method: Method,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut req = node.http.request(method, node.url(path)).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(b);
    }
    let res = req.send().await.expect("answered");
    let stream = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if stream {
        return (res.status().as_u16(), Value::Null);
    }
    common::read(res).await
}

#[tokio::test]
async fn every_function_bearing_route_needs_exactly_its_functions() {
    let node = Node::start().await;
    let routes = table();

    // The table covers every route of the API document that takes a user token.
    let (status, docs) = node.call(Method::GET, "/api-docs", None, None).await;
    assert_eq!(status, 200);
    let mut documented = BTreeSet::new();
    for (path, item) in docs["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let secured = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("userToken").is_some()));
            if secured {
                documented.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    let tabled: BTreeSet<String> = routes
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        documented, tabled,
        "every user-token route of /api-docs is in this table with its functions"
    );

    // One identity per set of functions, made on demand.
    let mut tokens: HashMap<BTreeSet<&str>, String> = HashMap::new();
    let mut n = 0;
    for r in &routes {
        let mut sets: Vec<(Vec<&str>, Option<&str>)> = vec![(r.requires.to_vec(), None)];
        for f in r.requires {
            let lacking: Vec<&str> = r.requires.iter().copied().filter(|g| g != f).collect();
            sets.push((lacking, Some(f)));
        }
        for (set, lacks) in sets {
            let key: BTreeSet<&str> = set.iter().copied().collect();
            if !tokens.contains_key(&key) {
                n += 1;
                let (_, token) = node.identity_with(&format!("caller-{n}"), &set).await;
                tokens.insert(key.clone(), token);
            }
            let token = tokens[&key].clone();
            // A fresh target for the identity routes, so a delete or rename always has one.
            n += 1;
            let path = if r.path.starts_with("/api/auth/identity/{id}") {
                let (target, _) = node.identity_with(&format!("target-{n}"), &[]).await;
                r.path.replace("{id}", &target)
            } else {
                r.path
                    .replace("{id}", "no-such-id")
                    .replace("{clientId}", "dev")
            };
            let body = r.body.as_ref().map(|b| {
                let text = b.to_string().replace("{name}", &format!("new-{n}"));
                serde_json::from_str::<Value>(&text).expect("body")
            });
            let what = format!("{} {path} holding {set:?}", r.method);
            let (status, reply) =
                status_of(&node, r.method.clone(), &path, &token, body.as_ref()).await;
            match lacks {
                Some(f) => assert_forbidden_naming(status, &reply, &[f], &what),
                None => assert!(
                    ![401, 403].contains(&status) && status < 500,
                    "{what}: {status} {reply}"
                ),
            }
        }
    }
}
