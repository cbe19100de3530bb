//! WebSocket close codes. Standard codes where one fits; the 4000 range for Morrigan's own
//! reasons, each with a fixed meaning so that a device can decide whether to reconnect.

/// Normal closure (a device stopping on purpose uses this).
pub const NORMAL: u16 = 1000;
/// The server is shutting down or restarting: reconnect after a random delay.
pub const GOING_AWAY: u16 = 1001;
/// The peer sent something the protocol does not allow at the frame level.
pub const PROTOCOL_ERROR: u16 = 1002;
/// A close frame without a code: reported when the peer sent one (never sent on the wire).
pub const NO_STATUS: u16 = 1005;
/// No close frame: recorded when the socket ended without one (never sent on the wire).
pub const ABNORMAL: u16 = 1006;
/// A text frame was not valid UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;
/// A message exceeded the server's size limit.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// The server failed unexpectedly.
pub const INTERNAL_ERROR: u16 = 1011;

/// An operator closed the connection (`DELETE /api/core/connection/:id`). Reconnecting is allowed.
pub const CLOSED_BY_OPERATOR: u16 = 4000;
/// A newer connection of the same client was accepted; this one is history. Do not reconnect
/// from this socket's session: the newer one is live.
pub const SUPERSEDED: u16 = 4001;
/// The connection missed two heartbeat intervals.
pub const HEARTBEAT_TIMEOUT: u16 = 4002;
/// The client was deprovisioned or its identity token revoked: stop retrying.
pub const REVOKED: u16 = 4003;
/// The device did not read what the server wrote within the write timeout
/// (`--write-timeout`): the server dropped the socket rather than let one slow reader hold
/// anything up. A device that stopped reading rarely sees this frame (it is queued behind the
/// unread data); its record says so. Reconnect.
pub const WRITE_TIMEOUT: u16 = 4008;

/// What a client should do after a close with `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// Reconnect with backoff.
    Reconnect,
    /// Reconnect, but spread out: the whole fleet was told at once (server going away).
    ReconnectWithJitter,
    /// Do not reconnect: the identity is no longer valid or another session took over.
    Stop,
}

/// Maps a close code to the client's expected reaction.
pub fn advice(code: u16) -> Advice {
    match code {
        REVOKED => Advice::Stop,
        SUPERSEDED => Advice::Stop,
        GOING_AWAY => Advice::ReconnectWithJitter,
        _ => Advice::Reconnect,
    }
}

/// A short human name for a close code, for logs and metrics labels.
pub fn reason_name(code: u16) -> &'static str {
    match code {
        NORMAL => "normal",
        GOING_AWAY => "going_away",
        PROTOCOL_ERROR => "protocol_error",
        MESSAGE_TOO_BIG => "message_too_big",
        INTERNAL_ERROR => "internal_error",
        CLOSED_BY_OPERATOR => "closed_by_operator",
        SUPERSEDED => "superseded",
        HEARTBEAT_TIMEOUT => "heartbeat_timeout",
        REVOKED => "revoked",
        WRITE_TIMEOUT => "write_timeout",
        NO_STATUS => "no_status",
        ABNORMAL => "abnormal",
        INVALID_PAYLOAD => "invalid_payload",
        _ => "other",
    }
}
