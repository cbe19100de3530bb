//! `/api/auth`: login and operator identities.

use std::net::{IpAddr, SocketAddr};

use axum::Json;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use morrigan_protocol::api::{
    AuthDetails, IdentityList, IdentityRequest, IdentityResponse, LoginRequest, TokenResponse,
};
use morrigan_protocol::records::Identity;
use morrigan_protocol::time_format;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiJson;
use super::extract::{ClientAddress, User};
use super::responses::{BadRequest, NotFound, Refused};
use crate::auth::{self, functions};
use crate::error::{ApiError, ApiResult};
use crate::passwords::HashError;
use crate::state::AppState;
use crate::store::{IdentityChange, IdentityRow};
use morrigan_protocol::api::ErrorBody;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(list_identities, create_identity))
        .routes(routes!(get_me, patch_me))
        .routes(routes!(get_identity, patch_identity, delete_identity))
}

fn public(row: &IdentityRow) -> Identity {
    Identity {
        id: row.id.clone(),
        name: row.name.clone(),
        functions: row.functions.clone(),
        created: row.created.clone(),
    }
}

fn identity_body(row: &IdentityRow) -> Json<IdentityResponse> {
    Json(IdentityResponse {
        state: "success".into(),
        identity: public(row),
    })
}

fn invalid_login() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "failed",
        "Invalid username/password.",
    )
}

/// Logs in. Unknown user and wrong password get the same answer, in the same time. Failed
/// logins are throttled per source address and per name (see [`crate::throttle`]): a
/// throttled attempt is answered 429 with `Retry-After` without being checked. The password
/// is checked by one of a few hashing threads (see [`crate::passwords`]): 503 with
/// `Retry-After` when none is free in time.
#[utoipa::path(post, path = "/api/auth", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = TokenResponse),
              (status = 400, description = "Malformed body", body = ErrorBody),
              (status = 403, description = "Invalid username/password", body = ErrorBody),
              (status = 429, description = "Too many failed logins from this address or for this name; see Retry-After", body = ErrorBody),
              (status = 503, description = "Too many logins in progress; see Retry-After", body = ErrorBody)))]
async fn login(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ClientAddress(client): ClientAddress,
    ApiJson(req): ApiJson<LoginRequest>,
) -> ApiResult<Json<TokenResponse>> {
    if req.name.is_empty() {
        return Err(ApiError::bad_request("No username specified."));
    }
    if req.password.is_empty() {
        return Err(ApiError::bad_request("No password specified."));
    }
    if req.password.len() > 1024 || req.name.len() > 64 {
        s.metrics.login_failed("password");
        return Err(invalid_login());
    }
    let address = client.parse::<IpAddr>().unwrap_or(peer.ip());
    let attempt = s
        .login_throttle
        .attempt(address, &req.name)
        .map_err(|throttled| {
            s.metrics.login_failed("throttled");
            tracing::info!(%address, "login throttled");
            ApiError::from(throttled)
        })?;
    let row = s.store.identity_by_name(&req.name).await?;
    let hash = row.as_ref().map(|r| r.password_hash.as_str());
    let ok = match s.passwords.verify(&req.password, hash).await {
        Ok(ok) => ok,
        Err(e) => {
            if matches!(e, HashError::Busy) {
                s.metrics.login_failed("busy");
            }
            return Err(e.into());
        }
    };
    let Some(row) = row.filter(|_| ok) else {
        attempt.failed();
        s.metrics.login_failed("password");
        tracing::info!(%address, "login refused");
        return Err(invalid_login());
    };
    attempt.succeeded();
    let token = s
        .credentials
        .issue_user(&row.id)
        .await
        .map_err(|e| match e {
            crate::credentials::CredentialError::Store(e) => ApiError::from(e),
            other => ApiError::internal(other.to_string()),
        })?;
    tracing::info!(identity = %row.name, "login");
    Ok(Json(TokenResponse {
        state: "success".into(),
        token,
    }))
}

/// Lists identities (function `auth.identity.get.all`).
#[utoipa::path(get, path = "/api/auth/identity", tag = "auth", security(("userToken" = [])),
    responses((status = 200, body = IdentityList),
              Refused))]
async fn list_identities(State(s): State<AppState>, user: User) -> ApiResult<Json<IdentityList>> {
    user.require(&[functions::IDENTITY_GET_ALL])?;
    let rows = s.store.identities().await?;
    let list: Vec<Identity> = rows.iter().map(public).collect();
    Ok(Json(IdentityList {
        state: "success".into(),
        identities: list,
    }))
}

fn password_of(auth: &AuthDetails) -> ApiResult<&str> {
    match auth.kind.as_deref() {
        Some("password") | None => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "Unsupported authentication type '{other}' (only 'password')."
            )));
        }
    }
    let password = auth
        .password
        .as_deref()
        .ok_or_else(|| ApiError::bad_request("No password specified."))?;
    if !auth::valid_password(password) {
        return Err(ApiError::bad_request(
            "Invalid password format (8 to 1024 characters).",
        ));
    }
    Ok(password)
}

fn check_name(name: &str) -> ApiResult<()> {
    if auth::valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "Invalid name format (1-64 characters of [A-Za-z0-9_.-]).",
        ))
    }
}

/// Creates an identity (function `auth.identity.create`) holding only functions the caller
/// holds (403 naming the others).
#[utoipa::path(post, path = "/api/auth/identity", tag = "auth", security(("userToken" = [])),
    request_body = IdentityRequest,
    responses((status = 200, body = IdentityResponse),
              BadRequest,
              Refused))]
async fn create_identity(
    State(s): State<AppState>,
    user: User,
    ApiJson(req): ApiJson<IdentityRequest>,
) -> ApiResult<Json<IdentityResponse>> {
    user.require(&[functions::IDENTITY_CREATE])?;
    let name = req
        .name
        .ok_or_else(|| ApiError::bad_request("No user name specified."))?;
    check_name(&name)?;
    let auth = req.auth.ok_or_else(|| {
        ApiError::bad_request("No authentication details specified for new identity.")
    })?;
    let password = password_of(&auth)?.to_string();
    let functions = req.functions.unwrap_or_default();
    auth::validate_functions(&functions)?;
    user.may_grant(&functions)?;
    if s.store.identity_by_name(&name).await?.is_some() {
        return Err(ApiError::bad_request("Identity name already in use."));
    }
    let hash = s.passwords.hash(&password).await?;
    let now = time_format::now();
    let row = IdentityRow {
        id: uuid::Uuid::new_v4().to_string(),
        name,
        functions,
        password_hash: hash,
        created: now.clone(),
        updated: now,
    };
    match s.store.insert_identity(&row).await {
        Err(crate::store::StoreError::Conflict(_)) => {
            return Err(ApiError::bad_request("Identity name already in use."));
        }
        other => other?,
    }
    tracing::info!(by = %user.identity.name, identity = %row.name, "identity created");
    Ok(identity_body(&row))
}

/// The caller's own identity.
#[utoipa::path(get, path = "/api/auth/identity/me", tag = "auth", security(("userToken" = [])),
    responses((status = 200, body = IdentityResponse), (status = 401, body = ErrorBody)))]
async fn get_me(user: User) -> Json<IdentityResponse> {
    identity_body(&user.identity)
}

/// Changes the caller's own name or password (not functions). A password change revokes the
/// identity's other sessions.
#[utoipa::path(patch, path = "/api/auth/identity/me", tag = "auth", security(("userToken" = [])),
    request_body = IdentityRequest,
    responses((status = 200, body = IdentityResponse),
              BadRequest,
              (status = 401, body = ErrorBody),
              (status = 403, description = "Tried to change functions", body = ErrorBody)))]
async fn patch_me(
    State(s): State<AppState>,
    user: User,
    ApiJson(req): ApiJson<IdentityRequest>,
) -> ApiResult<Json<IdentityResponse>> {
    if req.functions.is_some() {
        return Err(ApiError::forbidden(
            "Access to functions cannot be modified via the \"me\" endpoint.",
        ));
    }
    let token_id = user.token_id.clone();
    let row = apply_patch(&s, user.identity, req, Some(&token_id)).await?;
    Ok(identity_body(&row))
}

async fn apply_patch(
    s: &AppState,
    mut row: IdentityRow,
    req: IdentityRequest,
    keep_session: Option<&str>,
) -> ApiResult<IdentityRow> {
    if let Some(name) = req.name
        && name != row.name
    {
        check_name(&name)?;
        if s.store.identity_by_name(&name).await?.is_some() {
            return Err(ApiError::bad_request("Identity name already in use."));
        }
        row.name = name;
    }
    if let Some(functions) = req.functions {
        auth::validate_functions(&functions)?;
        row.functions = functions;
    }
    let mut password_changed = false;
    if let Some(auth) = req.auth {
        let password = password_of(&auth)?;
        row.password_hash = s.passwords.hash(password).await?;
        password_changed = true;
    }
    row.updated = time_format::now();
    let updated = s.credentials.update_identity(&row).await;
    match updated {
        Ok(IdentityChange::Done) => {}
        Ok(IdentityChange::NotFound) => return Err(ApiError::not_found("No such identity.")),
        Ok(IdentityChange::LastFull) => {
            return Err(ApiError::conflict(format!(
                "'{}' is the last identity holding every function; it cannot lose any.",
                row.name
            )));
        }
        Err(crate::store::StoreError::Conflict(_)) => {
            return Err(ApiError::bad_request("Identity name already in use."));
        }
        Err(e) => return Err(e.into()),
    }
    if password_changed {
        // A password change ends the identity's other sessions.
        s.credentials.revoke_sessions(&row.id, keep_session).await?;
    }
    Ok(row)
}

/// One identity (function `auth.identity.get.all`).
#[utoipa::path(get, path = "/api/auth/identity/{id}", tag = "auth", security(("userToken" = [])),
    params(("id" = String, Path, description = "Identity id")),
    responses((status = 200, body = IdentityResponse),
              Refused,
              NotFound))]
async fn get_identity(
    State(s): State<AppState>,
    user: User,
    Path(id): Path<String>,
) -> ApiResult<Json<IdentityResponse>> {
    user.require(&[functions::IDENTITY_GET_ALL])?;
    let row = s
        .store
        .identity(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("No such identity."))?;
    Ok(identity_body(&row))
}

/// Changes an identity's name, password or functions (function `auth.identity.update.all`):
/// only an identity whose functions the caller holds, and only to functions the caller holds
/// (403 naming the others); never the last identity holding every function out of one (409).
#[utoipa::path(patch, path = "/api/auth/identity/{id}", tag = "auth", security(("userToken" = [])),
    params(("id" = String, Path, description = "Identity id")), request_body = IdentityRequest,
    responses((status = 200, body = IdentityResponse),
              BadRequest,
              Refused,
              NotFound,
              (status = 409, description = "The last identity holding every function would lose one", body = ErrorBody)))]
async fn patch_identity(
    State(s): State<AppState>,
    user: User,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<IdentityRequest>,
) -> ApiResult<Json<IdentityResponse>> {
    user.require(&[functions::IDENTITY_UPDATE_ALL])?;
    let row = managed_identity(&s, &user, &id).await?;
    if let Some(functions) = &req.functions {
        auth::validate_functions(functions)?;
        user.may_grant(functions)?;
    }
    let keep = (row.id == user.identity.id).then_some(user.token_id.as_str());
    let row = apply_patch(&s, row, req, keep).await?;
    tracing::info!(by = %user.identity.name, identity = %row.name, "identity updated");
    Ok(identity_body(&row))
}

/// Deletes an identity and revokes its sessions (function `auth.identity.delete.all`): only
/// an identity whose functions the caller holds (403), never the last identity holding every
/// function (409).
#[utoipa::path(delete, path = "/api/auth/identity/{id}", tag = "auth", security(("userToken" = [])),
    params(("id" = String, Path, description = "Identity id")),
    responses((status = 200, body = Value),
              Refused,
              NotFound,
              (status = 409, description = "The last identity holding every function", body = ErrorBody)))]
async fn delete_identity(
    State(s): State<AppState>,
    user: User,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    user.require(&[functions::IDENTITY_DELETE_ALL])?;
    let row = managed_identity(&s, &user, &id).await?;
    let deleted = s.credentials.delete_identity(&id).await?;
    match deleted {
        IdentityChange::Done => {}
        IdentityChange::NotFound => return Err(ApiError::not_found("No such identity.")),
        IdentityChange::LastFull => {
            return Err(ApiError::conflict(format!(
                "'{}' is the last identity holding every function; it cannot be deleted.",
                row.name
            )));
        }
    }
    tracing::info!(by = %user.identity.name, identity = %id, "identity deleted");
    Ok(Json(json!({"state": "success"})))
}

/// The identity `id`, if `user` may manage it (404, 403).
async fn managed_identity(s: &AppState, user: &User, id: &str) -> ApiResult<IdentityRow> {
    let row = s
        .store
        .identity(id)
        .await?
        .ok_or_else(|| ApiError::not_found("No such identity."))?;
    user.may_manage(&row)?;
    Ok(row)
}
