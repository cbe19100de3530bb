//! Operators: login, identities, functions, and the request-body and authorization rules that
//! every management route shares.

mod common;

use common::{ADMIN_PASSWORD, Node};
use reqwest::Method;
use serde_json::{Value, json};

/// Every management route, with a body where it takes one (`{id}` is replaced per test).
fn management_routes(identity_id: &str) -> Vec<(Method, String, Option<Value>)> {
    vec![
        (Method::GET, "/api/auth/identity".into(), None),
        (
            Method::POST,
            "/api/auth/identity".into(),
            Some(json!({"name": "x", "auth": {"password": "long-enough"}})),
        ),
        (
            Method::GET,
            format!("/api/auth/identity/{identity_id}"),
            None,
        ),
        (
            Method::PATCH,
            format!("/api/auth/identity/{identity_id}"),
            Some(json!({"name": "renamed"})),
        ),
        (
            Method::DELETE,
            format!("/api/auth/identity/{identity_id}"),
            None,
        ),
        (
            Method::POST,
            "/api/core/client/provision".into(),
            Some(json!({"id": "dev"})),
        ),
        (Method::GET, "/api/core/client".into(), None),
        (Method::GET, "/api/core/client/dev".into(), None),
        (Method::DELETE, "/api/core/client/dev".into(), None),
        (Method::GET, "/api/core/connection".into(), None),
        (Method::GET, "/api/core/connection/abc".into(), None),
        (Method::DELETE, "/api/core/connection/abc".into(), None),
        (
            Method::POST,
            "/api/core/connection/abc/send".into(),
            Some(json!({"type": "a.b"})),
        ),
        (Method::GET, "/api/core/capability".into(), None),
        (Method::GET, "/api/core/capability/dev".into(), None),
    ]
}

fn assert_error(status: u16, body: &Value, expected: u16, what: &str) {
    assert_eq!(status, expected, "{what}: {body}");
    assert_eq!(body["status"], "failed", "{what}: {body}");
    assert!(body["reason"].is_string(), "{what}: {body}");
}

#[tokio::test]
async fn login_refusals_do_not_tell_unknown_users_from_wrong_passwords() {
    let node = Node::start().await;
    let (status, ok) = node.try_login("admin", ADMIN_PASSWORD).await;
    assert_eq!(status, 200);
    assert_eq!(ok["state"], "success");
    assert!(
        ok["token"]
            .as_str()
            .is_some_and(|t| t.split('.').count() == 3)
    );

    let (s1, wrong_password) = node.try_login("admin", "not-the-password").await;
    let (s2, unknown_user) = node.try_login("nobody", "not-the-password").await;
    assert_error(s1, &wrong_password, 403, "wrong password");
    assert_eq!((s1, &wrong_password), (s2, &unknown_user));

    // A token of the wrong audience (a device's identity token) is not a user token.
    let identity = node.provision("dev-1").await;
    let (status, body) = node.get("/api/core/client", &identity).await;
    assert_error(status, &body, 401, "identity token as user token");
    let (status, body) = node.get("/api/core/client", "garbage").await;
    assert_error(status, &body, 401, "garbage token");
}

#[tokio::test]
async fn malformed_bodies_get_400_request_error_and_the_server_keeps_serving() {
    let node = Node::start().await;
    let cases: Vec<(&str, Option<&str>, &[u8])> = vec![
        ("/api/auth", None, b"{not json"),
        ("/api/auth", None, br#"{"name": 5, "password": "x"}"#),
        ("/api/auth", None, br#"{"name": "admin"}"#),
        ("/api/auth", None, b""),
        ("/api/auth", None, b"[1,2]"),
        ("/api/auth/identity", Some(&node.admin), b"{\"name\":"),
        (
            "/api/auth/identity",
            Some(&node.admin),
            br#"{"name": "x", "auth": {"password": "long-enough"}, "functions": "api"}"#,
        ),
        ("/api/core/client/provision", Some(&node.admin), b"nope"),
        (
            "/api/core/client/provision",
            Some(&node.admin),
            br#"{"id": 42}"#,
        ),
        ("/api/core/client/provision", Some(&node.admin), br#"{}"#),
    ];
    for (path, token, body) in cases {
        let (status, reply) = node
            .call(Method::POST, path, token, Some(body.to_vec()))
            .await;
        let what = format!("POST {path} {}", String::from_utf8_lossy(body));
        assert_error(status, &reply, 400, &what);
        assert_eq!(reply["state"], "requestError", "{what}: {reply}");
    }
    // PATCH bodies too.
    let (status, reply) = node
        .call(
            Method::PATCH,
            "/api/auth/identity/me",
            Some(&node.admin),
            Some(br#"{"name": ["admin"]}"#.to_vec()),
        )
        .await;
    assert_error(status, &reply, 400, "PATCH me with a wrong type");
    assert_eq!(reply["state"], "requestError");
    // A body without a Content-Type is still read as JSON (the original's clients omit it).
    let res = node
        .http
        .post(node.url("/api/auth"))
        .body(json!({"name": "admin", "password": ADMIN_PASSWORD}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    // Still serving.
    node.login("admin", ADMIN_PASSWORD).await;
}

#[tokio::test]
async fn identities_crud_with_function_checks() {
    let node = Node::start().await;
    let admin = node.admin.clone();

    // Create.
    let (status, created) = node
        .post(
            "/api/auth/identity",
            &admin,
            &json!({"name": "ops", "auth": {"type": "password", "password": "ops-password"}, "functions": ["api"]}),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["state"], "success");
    let ops = &created["identity"];
    assert_eq!(ops["name"], "ops");
    assert_eq!(ops["functions"], json!(["api"]));
    assert!(ops.get("password").is_none() && ops.get("passwordHash").is_none());
    let ops_id = ops["id"].as_str().unwrap().to_string();

    // Duplicate name, bad name, short password, unknown function.
    for (body, what) in [
        (
            json!({"name": "ops", "auth": {"password": "ops-password"}}),
            "duplicate",
        ),
        (
            json!({"name": "bad name!", "auth": {"password": "ops-password"}}),
            "bad name",
        ),
        (
            json!({"name": "short", "auth": {"password": "short"}}),
            "short password",
        ),
        (json!({"name": "noauth"}), "no auth"),
        (
            json!({"name": "fn", "auth": {"password": "ops-password"}, "functions": ["api", "root"]}),
            "unknown function",
        ),
    ] {
        let (status, body) = node.post("/api/auth/identity", &admin, &body).await;
        assert_error(status, &body, 400, what);
        assert_eq!(body["state"], "requestError");
    }

    // List and get.
    let (status, list) = node.get("/api/auth/identity", &admin).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list["identities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"admin") && names.contains(&"ops"), "{list}");
    let (status, one) = node
        .get(&format!("/api/auth/identity/{ops_id}"), &admin)
        .await;
    assert_eq!(status, 200);
    assert_eq!(one["identity"]["name"], "ops");
    let (status, body) = node.get("/api/auth/identity/nope", &admin).await;
    assert_error(status, &body, 404, "get unknown identity");

    // The ops identity lacks the identity functions: 403 on each identity route.
    let ops_token = node.login("ops", "ops-password").await;
    for (method, path, body) in management_routes(&ops_id).into_iter().take(5) {
        let (status, reply) = node
            .call(
                method.clone(),
                &path,
                Some(&ops_token),
                body.map(|b| b.to_string().into_bytes()),
            )
            .await;
        assert_error(status, &reply, 403, &format!("{method} {path} as ops"));
        assert_eq!(reply["state"], "forbidden");
    }

    // Patch: functions and name; unknown function refused.
    let (status, body) = node
        .patch(
            &format!("/api/auth/identity/{ops_id}"),
            &admin,
            &json!({"functions": ["api", "nonsense"]}),
        )
        .await;
    assert_error(status, &body, 400, "patch unknown function");
    let (status, patched) = node
        .patch(
            &format!("/api/auth/identity/{ops_id}"),
            &admin,
            &json!({"name": "ops2", "functions": ["api", "connection.send"]}),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["identity"]["name"], "ops2");
    assert_eq!(
        patched["identity"]["functions"],
        json!(["api", "connection.send"])
    );
    let (status, body) = node
        .patch("/api/auth/identity/nope", &admin, &json!({"name": "x"}))
        .await;
    assert_error(status, &body, 404, "patch unknown identity");

    // Delete: its tokens stop working.
    let (status, body) = node
        .delete(&format!("/api/auth/identity/{ops_id}"), &admin)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "success");
    let (status, body) = node.get("/api/auth/identity/me", &ops_token).await;
    assert_error(status, &body, 401, "token of a deleted identity");
    let (status, body) = node
        .delete(&format!("/api/auth/identity/{ops_id}"), &admin)
        .await;
    assert_error(status, &body, 404, "delete twice");
    let (status, body) = node.try_login("ops2", "ops-password").await;
    assert_error(status, &body, 403, "login of a deleted identity");
}

#[tokio::test]
async fn every_management_route_needs_a_token_and_a_function() {
    let node = Node::start().await;
    let (nobody_id, nobody) = node.identity_with("nobody", &[]).await;
    for (method, path, body) in management_routes(&nobody_id) {
        let bytes = body.map(|b| b.to_string().into_bytes());
        let (status, reply) = node.call(method.clone(), &path, None, bytes.clone()).await;
        assert_error(
            status,
            &reply,
            401,
            &format!("{method} {path} without a token"),
        );
        let (status, reply) = node.call(method.clone(), &path, Some(&nobody), bytes).await;
        assert_error(
            status,
            &reply,
            403,
            &format!("{method} {path} without functions"),
        );
    }
    // `me` needs a token but no function.
    let (status, me) = node.get("/api/auth/identity/me", &nobody).await;
    assert_eq!(status, 200);
    assert_eq!(me["identity"]["name"], "nobody");
    let (status, body) = node
        .call(Method::GET, "/api/auth/identity/me", None, None)
        .await;
    assert_error(status, &body, 401, "me without a token");
}

#[tokio::test]
async fn an_upgrade_header_does_not_skip_authorization() {
    let node = Node::start().await;
    let (nobody_id, nobody) = node.identity_with("nobody", &[]).await;
    for (method, path, body) in management_routes(&nobody_id) {
        for token in [None, Some(nobody.as_str())] {
            let mut req = node
                .http
                .request(method.clone(), node.url(&path))
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = &body {
                req = req.body(b.to_string());
            }
            let (status, reply) = common::read(req.send().await.unwrap()).await;
            let expected = if token.is_some() { 403 } else { 401 };
            assert_error(
                status,
                &reply,
                expected,
                &format!("{method} {path} with Upgrade, token: {}", token.is_some()),
            );
        }
    }
}

#[tokio::test]
async fn me_cannot_change_functions_and_a_password_change_revokes_other_sessions() {
    let node = Node::start().await;
    let (_, session_a) = node.identity_with("ops", &["api"]).await;
    let session_b = node.login("ops", "password-of-ops").await;

    let (status, body) = node
        .patch(
            "/api/auth/identity/me",
            &session_a,
            &json!({"functions": ["api", "auth.identity.create"]}),
        )
        .await;
    assert_error(status, &body, 403, "me changing functions");
    let (_, me) = node.get("/api/auth/identity/me", &session_a).await;
    assert_eq!(me["identity"]["functions"], json!(["api"]));

    let (status, body) = node
        .patch(
            "/api/auth/identity/me",
            &session_a,
            &json!({"auth": {"type": "password", "password": "new-password-1"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // The session that changed it keeps working; the other one is revoked.
    let (status, _) = node.get("/api/auth/identity/me", &session_a).await;
    assert_eq!(status, 200);
    let (status, body) = node.get("/api/auth/identity/me", &session_b).await;
    assert_error(status, &body, 401, "other session after password change");
    // Old password refused, new accepted.
    let (status, _) = node.try_login("ops", "password-of-ops").await;
    assert_eq!(status, 403);
    node.login("ops", "new-password-1").await;

    // An administrator changing someone's password revokes all of that identity's sessions.
    let (status, body) = node
        .patch(
            &format!(
                "/api/auth/identity/{}",
                me["identity"]["id"].as_str().unwrap()
            ),
            &node.admin,
            &json!({"auth": {"password": "new-password-2"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = node.get("/api/auth/identity/me", &session_a).await;
    assert_error(status, &body, 401, "session after an admin password change");
    let session_a = node.login("ops", "new-password-2").await;

    // Renaming oneself works; taking a used name does not.
    let (status, body) = node
        .patch(
            "/api/auth/identity/me",
            &session_a,
            &json!({"name": "admin"}),
        )
        .await;
    assert_error(status, &body, 400, "rename to a used name");
    let (status, body) = node
        .patch(
            "/api/auth/identity/me",
            &session_a,
            &json!({"name": "ops-renamed"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["identity"]["name"], "ops-renamed");
}
