//! Function (permission) names: what an operator identity may do. They are wire data: they
//! appear in identity records, in the capability listing and in every 403's reason.

/// Use the core API (connections, clients, capabilities).
pub const API: &str = "api";
/// Declared by the original; kept so existing identities validate.
pub const CONNECTION: &str = "connection";
/// Push a message to a connection.
pub const CONNECTION_SEND: &str = "connection.send";
/// Close a connection.
pub const CONNECTION_CLOSE: &str = "connection.close";
/// Declared by the original; kept so existing identities validate.
pub const AUTH_IDENTITY: &str = "auth.identity";
pub const IDENTITY_CREATE: &str = "auth.identity.create";
pub const IDENTITY_GET_ALL: &str = "auth.identity.get.all";
pub const IDENTITY_UPDATE_ALL: &str = "auth.identity.update.all";
pub const IDENTITY_DELETE_ALL: &str = "auth.identity.delete.all";

/// Every function that exists; identities may only hold these.
pub const ALL: &[&str] = &[
    API,
    CONNECTION,
    CONNECTION_SEND,
    CONNECTION_CLOSE,
    AUTH_IDENTITY,
    IDENTITY_CREATE,
    IDENTITY_GET_ALL,
    IDENTITY_UPDATE_ALL,
    IDENTITY_DELETE_ALL,
];
