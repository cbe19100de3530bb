//! `morrigan message`: tracked and uplink message records (`show`, `ls`); and what `client send`,
//! `client call` and a tracked `connection send` share: checking the message, sending it, and
//! reporting the outcome with its exit code.
//!
//! The outcome of a send, as scripts rely on it:
//!
//! * HTTP 200/202: exit 0; prints `<message id> <state>` (`written`, `queued`, `acked`), or for
//!   `replied` the reply payload as pretty JSON.
//! * HTTP 504 (no answer within the timeout): exit [`EXIT_TIMEOUT`]; the message keeps its own
//!   state (`message show ID`).
//! * anything else (rejected by the device, offline, outbox full, unknown client...): exit 1.
//!
//! A failure is one line on stderr, `error: <the server's reason> (...)`, naming the message
//! when there is one. With `--json` the server's answer is printed as received whenever it is
//! a send result (it carries `messageId`), failures included, so a script always learns the id.

use clap::{Args, Subcommand};
use morrigan_protocol::messages::{
    MessageList, MessageRecord, MessageResponse, MessageState, SendResult,
};
use morrigan_protocol::paths;
use reqwest::Method;
use serde_json::Value;
use url::Url;

use super::api::{Api, refusal_reason};
use super::common::{Remote, parse, print_raw};
use super::table::{self, Table, short_time, text};
use crate::Failure;

/// Exit code of a send whose answer did not come in time (HTTP 504).
pub const EXIT_TIMEOUT: u8 = 4;

/// The widest reply or reason shown in a `message ls` table cell.
const CELL: usize = 60;

#[derive(Args, Debug)]
pub struct MessageCmd {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    action: MessageAction,
}

#[derive(Subcommand, Debug)]
enum MessageAction {
    /// Show one message: its state, the times of each transition, the reply or the reason.
    Show { id: String },
    /// List a client's messages, newest first.
    #[command(visible_alias = "list")]
    Ls {
        /// The client whose messages to list.
        #[arg(long = "client", value_name = "CLIENT")]
        client: String,
        /// Only messages in this state.
        #[arg(long, value_parser = state_names())]
        state: Option<String>,
        /// Only operator → device (`out`) or device → operator (`in`) messages.
        #[arg(long, value_parser = ["in", "out"])]
        direction: Option<String>,
        /// At most this many messages.
        #[arg(long)]
        limit: Option<u32>,
    },
}

fn state_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(MessageState::ALL.map(MessageState::as_str))
}

pub async fn run(cmd: MessageCmd) -> Result<(), Failure> {
    let api = Api::authenticated(cmd.remote.url.as_deref())?;
    let as_json = cmd.remote.json;
    match cmd.action {
        MessageAction::Show { id } => {
            let body = api.get(paths::MESSAGE, &[&id], &[]).await?;
            let response: MessageResponse = parse(&body)?;
            if as_json {
                // The record, every field the server sent included.
                let raw: Value = parse(&body)?;
                println!("{}", raw["message"]);
            } else {
                show(&response.message);
            }
        }
        MessageAction::Ls {
            client,
            state,
            direction,
            limit,
        } => {
            let mut query = Vec::new();
            if let Some(direction) = direction {
                query.push(("direction", direction));
            }
            if let Some(state) = state {
                query.push(("state", state));
            }
            if let Some(limit) = limit {
                query.push(("limit", limit.to_string()));
            }
            let body = api
                .get(paths::CLIENT, &[&client, "messages"], &query)
                .await?;
            let list: MessageList = parse(&body)?;
            if as_json {
                let raw: Value = parse(&body)?;
                println!("{}", raw["messages"]);
            } else {
                list_table(&list.messages);
            }
        }
    }
    Ok(())
}

fn list_table(messages: &[MessageRecord]) {
    let mut table = Table::new([
        "ID",
        "DIRECTION",
        "TYPE",
        "STATE",
        "CREATED",
        "REPLY/REASON",
    ]);
    for m in messages {
        table.row([
            text(m.id.as_str()),
            m.direction.as_str().to_string(),
            text(m.kind.as_str()),
            m.state.as_str().to_string(),
            short_time(m.created.as_str()),
            outcome(m),
        ]);
    }
    table.print();
}

/// The reason, else the reply as compact JSON, cut to [`CELL`] characters; `-` for neither.
fn outcome(m: &MessageRecord) -> String {
    let full = match (&m.reason, &m.reply) {
        (Some(reason), _) => reason.clone(),
        (None, Some(reply)) => reply.to_string(),
        (None, None) if m.state == MessageState::Replied => "null".to_string(),
        (None, None) => return "-".to_string(),
    };
    if full.chars().count() > CELL {
        let cut: String = full.chars().take(CELL - 1).collect();
        format!("{cut}…")
    } else {
        text(full.as_str())
    }
}

fn show(m: &MessageRecord) {
    let json = |v: &Option<Value>| v.as_ref().map(Value::to_string);
    table::print_fields(&[
        ("id", text(m.id.as_str())),
        ("client", text(m.client_id.as_str())),
        ("connection", text(m.connection_id.as_deref())),
        ("direction", m.direction.as_str().to_string()),
        ("type", text(m.kind.as_str())),
        ("track", m.track.as_str().to_string()),
        ("state", m.state.as_str().to_string()),
        ("created", text(m.created.as_str())),
        ("written", text(m.written.as_deref())),
        ("acked", text(m.acked.as_deref())),
        ("replied", text(m.replied.as_deref())),
        ("ended", text(m.ended.as_deref())),
        ("expires", text(m.expires.as_deref())),
        ("reply", text(json(&m.reply).as_deref())),
        ("reason", text(m.reason.as_deref())),
        ("body", m.body.to_string()),
    ]);
}

/// Checks a message given on the command line before sending it: a JSON object with a string
/// `type` (the server checks the type's grammar). It is sent exactly as typed.
pub fn check_message(message: &str) -> Result<(), Failure> {
    let value: Value = serde_json::from_str(message)
        .map_err(|e| Failure::msg(format!("the message is not JSON: {e}")))?;
    match value.get("type") {
        Some(Value::String(_)) if value.is_object() => Ok(()),
        _ => Err(Failure::msg(
            "the message must be a JSON object with a string \"type\"",
        )),
    }
}

/// Sends `body` (a tracked or client-addressed send) to `url` and reports the outcome (see the
/// module documentation). `Ok` exactly for HTTP 200 and 202.
pub async fn send(
    api: &Api,
    url: Url,
    body: String,
    headers: &[(&str, String)],
    as_json: bool,
) -> Result<(), Failure> {
    let (status, answer) = api.request(Method::POST, url, Some(body), headers).await?;
    report(status, &answer, as_json)
}

/// The outcome of a send answered `status` with `answer` (see the module documentation).
fn report(status: u16, answer: &str, as_json: bool) -> Result<(), Failure> {
    let result = serde_json::from_str::<SendResult>(answer).ok();
    if as_json && result.is_some() {
        print_raw(answer);
    }
    match (status, result) {
        (200 | 202, Some(result)) => {
            if !as_json {
                if result.state == MessageState::Replied.as_str() {
                    let reply = result.reply.unwrap_or(Value::Null);
                    let pretty =
                        serde_json::to_string_pretty(&reply).unwrap_or_else(|_| reply.to_string());
                    println!("{pretty}");
                } else {
                    println!("{} {}", result.message_id, result.state);
                }
            }
            Ok(())
        }
        (200 | 202, None) => Err(Failure::msg(format!(
            "unexpected answer from the server: {}",
            answer.trim()
        ))),
        (status, Some(result)) => {
            let reason = result
                .reason
                .filter(|r| !r.trim().is_empty())
                .unwrap_or_else(|| result.state.clone());
            let reason = reason
                .trim()
                .trim_end_matches('.')
                .replace(['\n', '\r'], " ");
            let line = format!(
                "{reason} ({}, message {}, HTTP {status})",
                result.state, result.message_id
            );
            let code = if status == 504 { EXIT_TIMEOUT } else { 1 };
            Err(Failure::new(code, line))
        }
        (status, None) => {
            let code = if status == 504 { EXIT_TIMEOUT } else { 1 };
            Err(Failure::new(code, refusal_reason(status, answer)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn exit(result: Result<(), Failure>) -> (u8, String) {
        match result {
            Ok(()) => (0, String::new()),
            Err(f) => (f.code, f.to_string()),
        }
    }

    #[test]
    fn messages_are_checked_locally() {
        assert!(check_message(r#"{"type":"agent.ping","payload":1}"#).is_ok());
        for bad in [
            "not json",
            "[1]",
            r#"{"payload":1}"#,
            r#"{"type":7}"#,
            "\"x\"",
        ] {
            let e = check_message(bad).unwrap_err();
            assert_eq!(e.code, 1, "{bad}");
        }
    }

    #[test]
    fn outcomes_map_to_exit_codes() {
        let ok = json!({"status": "success", "messageId": "m1", "state": "acked"}).to_string();
        assert_eq!(exit(report(200, &ok, false)).0, 0);
        let accepted =
            json!({"status": "accepted", "messageId": "m1", "state": "queued"}).to_string();
        assert_eq!(exit(report(202, &accepted, false)).0, 0);
        let timeout = json!({"status": "failed", "state": "timeout", "messageId": "m1",
            "reason": "No answer within 1 s"})
        .to_string();
        let (code, line) = exit(report(504, &timeout, false));
        assert_eq!(code, EXIT_TIMEOUT);
        assert_eq!(line, "No answer within 1 s (timeout, message m1, HTTP 504)");
        let rejected = json!({"status": "failed", "state": "rejected", "messageId": "m1",
            "reason": "disk full\n"})
        .to_string();
        let (code, line) = exit(report(422, &rejected, true));
        assert_eq!(code, 1);
        assert_eq!(line, "disk full (rejected, message m1, HTTP 422)");
        let offline = json!({"status": "failed", "state": "offline",
            "reason": "Client is offline."})
        .to_string();
        let (code, line) = exit(report(409, &offline, false));
        assert_eq!((code, line.as_str()), (1, "Client is offline (HTTP 409)"));
        assert_eq!(exit(report(504, "gateway timeout", false)).0, EXIT_TIMEOUT);
        assert_eq!(exit(report(200, "{}", false)).0, 1);
    }

    #[test]
    fn table_cells_say_reason_or_reply() {
        let mut m: MessageRecord = serde_json::from_value(json!({
            "id": "m1", "clientId": "c", "connectionId": null, "direction": "out",
            "type": "agent.ping", "body": {"type": "agent.ping"}, "track": "reply",
            "state": "replied", "created": "2026-01-02T03:04:05.678Z", "written": null,
            "acked": null, "replied": null, "ended": null, "expires": null,
            "reply": {"payload": {"n": 1}}, "reason": null
        }))
        .unwrap();
        assert_eq!(outcome(&m), r#"{"payload":{"n":1}}"#);
        m.reply = Some(json!("x".repeat(100)));
        let cell = outcome(&m);
        assert_eq!(cell.chars().count(), CELL);
        assert!(cell.ends_with('…'));
        m.reply = None;
        assert_eq!(outcome(&m), "null");
        m.state = MessageState::Rejected;
        m.reason = Some("no".into());
        assert_eq!(outcome(&m), "no");
        m.reason = None;
        assert_eq!(outcome(&m), "-");
    }
}
