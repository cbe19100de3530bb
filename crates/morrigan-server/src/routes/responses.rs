//! The error answers routes declare in the OpenAPI document, each once: every error body is an
//! [`ErrorBody`], and a route lists the refusals it can give by name. The types describe the
//! document only; the answers themselves are [`crate::error::ApiError`]s.
#![allow(dead_code)]

use morrigan_protocol::api::ErrorBody;
use utoipa::IntoResponses;

/// The refusals of every route that needs a user token.
#[derive(IntoResponses)]
pub enum Refused {
    #[response(status = 401, description = "No valid user token")]
    Unauthorized(ErrorBody),
    #[response(
        status = 403,
        description = "The user token lacks a function the route needs"
    )]
    Forbidden(ErrorBody),
}

/// The request is malformed or out of bounds; nothing was done.
#[derive(IntoResponses)]
#[response(status = 400, description = "Invalid request; nothing was done")]
pub struct BadRequest(ErrorBody);

/// No such record.
#[derive(IntoResponses)]
#[response(status = 404, description = "No such record")]
pub struct NotFound(ErrorBody);

/// The record's state does not allow it.
#[derive(IntoResponses)]
#[response(status = 409, description = "Conflicts with the record's state")]
pub struct Conflict(ErrorBody);

/// The store, the bus or a node did not answer in time; nothing was done.
#[derive(IntoResponses)]
#[response(
    status = 503,
    description = "The store, the cluster bus or a node is unavailable; nothing was done"
)]
pub struct Unavailable(ErrorBody);

/// The owning node took the command but gave no outcome in time.
#[derive(IntoResponses)]
#[response(
    status = 504,
    description = "No outcome in time; a frame not taken by its deadline is never written"
)]
pub struct Timeout(ErrorBody);
