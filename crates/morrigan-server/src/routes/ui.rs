//! The routes that are not part of the API, and so not in the OpenAPI document: the document
//! itself, its Swagger UI, the Prometheus metrics and the dashboard. Everything is served from
//! the binary (no CDN, nothing downloaded at run time).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::error::ApiError;
use crate::state::AppState;

/// Served paths that are intentionally not in the OpenAPI document (the OpenAPI completeness
/// test checks every other served path is documented).
pub const UNDOCUMENTED: &[&str] = &[
    morrigan_protocol::paths::API_DOCS,
    DOCS_VIEW,
    "/api-docs/view/{*file}",
    METRICS,
    DASHBOARD,
    "/dashboard/{file}",
];

/// Swagger UI over `/api-docs`.
pub const DOCS_VIEW: &str = "/api-docs/view";
/// Prometheus text exposition.
pub const METRICS: &str = "/metrics";
/// The operator dashboard.
pub const DASHBOARD: &str = "/dashboard";

const DASHBOARD_HTML: &str = include_str!("../dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("../dashboard/app.js");
const DASHBOARD_CSS: &str = include_str!("../dashboard/app.css");

/// Content-Security-Policy of the dashboard: its own files and API only.
const DASHBOARD_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; \
     base-uri 'none'";

/// The non-API routes, with the OpenAPI document they serve.
pub fn router(openapi: utoipa::openapi::OpenApi) -> Router<AppState> {
    let docs = Arc::new(openapi);
    let swagger = Arc::new(utoipa_swagger_ui::Config::new([
        morrigan_protocol::paths::API_DOCS,
    ]));
    let swagger_index = swagger.clone();
    Router::new()
        .route(
            morrigan_protocol::paths::API_DOCS,
            get(move || {
                let docs = docs.clone();
                async move { axum::Json(docs.as_ref().clone()) }
            }),
        )
        .route(
            DOCS_VIEW,
            get(move || {
                let config = swagger_index.clone();
                async move { swagger_file("index.html", config) }
            }),
        )
        .route(
            "/api-docs/view/{*file}",
            get(move |Path(file): Path<String>| {
                let config = swagger.clone();
                async move { swagger_file(&file, config) }
            }),
        )
        .route(METRICS, get(metrics))
        .route(DASHBOARD, get(|| async { dashboard_file("index.html") }))
        .route(
            "/dashboard/{file}",
            get(|Path(file): Path<String>| async move { dashboard_file(&file) }),
        )
}

/// One file of the vendored Swagger UI. The index is served at `/api-docs/view` (no trailing
/// slash: the server trims them), so its relative links are rewritten to `view/...`.
fn swagger_file(file: &str, config: Arc<utoipa_swagger_ui::Config<'static>>) -> Response {
    match utoipa_swagger_ui::serve(file, config) {
        Ok(Some(f)) => {
            let mut headers = vec![(header::CONTENT_TYPE, f.content_type.clone())];
            if f.gzpipped {
                headers.push((header::CONTENT_ENCODING, "gzip".to_string()));
            }
            let body = if file == "index.html" && !f.gzpipped {
                String::from_utf8_lossy(&f.bytes)
                    .replace("href=\"./", "href=\"view/")
                    .replace("src=\"./", "src=\"view/")
                    .into_bytes()
            } else {
                f.bytes.into_owned()
            };
            let mut res = (StatusCode::OK, body).into_response();
            for (k, v) in headers {
                if let Ok(v) = HeaderValue::from_str(&v) {
                    res.headers_mut().insert(k, v);
                }
            }
            res
        }
        Ok(None) => ApiError::not_found("No such file.").into_response(),
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}

fn dashboard_file(file: &str) -> Response {
    let (body, kind) = match file {
        "index.html" => (DASHBOARD_HTML, "text/html; charset=utf-8"),
        "app.js" => (DASHBOARD_JS, "text/javascript; charset=utf-8"),
        "app.css" => (DASHBOARD_CSS, "text/css; charset=utf-8"),
        _ => return ApiError::not_found("No such file.").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CONTENT_SECURITY_POLICY, DASHBOARD_CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Prometheus text exposition format 0.0.4.
async fn metrics(State(s): State<AppState>) -> Response {
    s.metrics
        .set_sockets(s.admission.http_connections(), s.admission.sockets());
    let body = s.metrics.render(s.hub.len());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Finishes the generated document: every response gets a description (OpenAPI requires one;
/// the annotations leave the common error statuses without).
pub fn complete(mut openapi: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::RefOr;
    for item in openapi.paths.paths.values_mut() {
        let ops = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ];
        for op in ops.into_iter().flatten() {
            for (status, response) in op.responses.responses.iter_mut() {
                if let RefOr::T(r) = response
                    && r.description.is_empty()
                {
                    r.description = describe(status).to_string();
                }
            }
        }
    }
    openapi
}

fn describe(status: &str) -> &'static str {
    match status {
        "200" => "Success",
        "400" => "Invalid request",
        "401" => "No valid token",
        "403" => "Missing function, or refused",
        "404" => "Not found",
        "409" => "Conflict: closed, not established, or already exists",
        "503" => "Unavailable: shutting down, or the node holding the connection is unreachable",
        "504" => "The node or connection did not answer in time",
        _ => "See the operation's description",
    }
}
