//! Tracked messages, the device side: what a handler's result answers ([`Answer`],
//! [`HandlerResult`]), the answer frames, and the memory of message ids that makes an
//! at-least-once delivery converge ([`Seen`]).
//!
//! A tracked frame is an application message with a top-level `"messageId"`. The client answers
//! each id exactly once per delivery it acts on: `connection.ack`, `connection.reply` (with the
//! handler's payload) or `connection.nack` (with a reason). The server may deliver the same id
//! again after a reconnect; the client then does not run the handler again, but re-sends the
//! answer it gave the first time (the server never got it, or it would not have re-delivered).

use std::collections::{HashMap, VecDeque};
use std::fmt::Display;

use morrigan_protocol::messages::{MESSAGE_ID, types};
use serde_json::{Value, json};

/// How many message ids a client remembers by default (the answers to the newest ones included).
pub const DEFAULT_MESSAGE_ID_MEMORY: usize = 1024;

/// The longest message id the client tracks. The server's ids are UUIDs (36 characters); a
/// longer one comes from something else and is not worth remembering (1024 of them would be).
pub(super) const MAX_MESSAGE_ID_LEN: usize = 128;

/// What the device answers to a tracked message.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// `connection.ack`: received and handled.
    Ack,
    /// `connection.reply` with this payload (implies the ack).
    Reply(Value),
    /// `connection.nack` with this reason: refused.
    Nack(String),
}

/// What a message handler may return. It decides the answer to a tracked message (a message
/// without a `messageId` is never answered, whatever its handler returns):
///
/// | handler returns | answer |
/// |---|---|
/// | `()` | `connection.ack` |
/// | `Ok(None)` / `Ok(())` | `connection.ack` |
/// | `Ok(Some(value))` | `connection.reply` with `payload: value` |
/// | `Err(e)` | `connection.nack` with `reason: e.to_string()` |
/// | an [`Answer`] | that answer |
pub trait HandlerResult {
    /// The answer this result stands for.
    fn into_answer(self) -> Answer;
}

impl HandlerResult for () {
    fn into_answer(self) -> Answer {
        Answer::Ack
    }
}

impl HandlerResult for Answer {
    fn into_answer(self) -> Answer {
        self
    }
}

impl<E: Display> HandlerResult for Result<Option<Value>, E> {
    fn into_answer(self) -> Answer {
        match self {
            Ok(Some(payload)) => Answer::Reply(payload),
            Ok(None) => Answer::Ack,
            Err(e) => Answer::Nack(e.to_string()),
        }
    }
}

impl<E: Display> HandlerResult for Result<(), E> {
    fn into_answer(self) -> Answer {
        match self {
            Ok(()) => Answer::Ack,
            Err(e) => Answer::Nack(e.to_string()),
        }
    }
}

/// The id of a tracked message: its `messageId`, when it is a non-empty string of at most
/// [`MAX_MESSAGE_ID_LEN`] bytes and the message is an application message (the server's own
/// `connection.*` frames are never answered: answering one could start an error ping-pong).
pub(super) fn tracked_id(message: &Value, ty: &str) -> Option<String> {
    let id = message.get(MESSAGE_ID)?.as_str()?;
    if ty.starts_with("connection.") {
        return None;
    }
    if id.is_empty() || id.len() > MAX_MESSAGE_ID_LEN {
        tracing::warn!(
            len = id.len(),
            "a messageId that is empty or too long: the message is handled as untracked"
        );
        return None;
    }
    Some(id.to_string())
}

/// The id of a tracked message, for handlers: the `messageId` field of `message` (`None` for an
/// untracked message).
pub fn message_id(message: &Value) -> Option<&str> {
    message.get(MESSAGE_ID)?.as_str()
}

/// The frame answering message `id` with `answer`, as sent.
pub(super) fn answer_frame(id: &str, answer: Answer) -> String {
    let frame = match answer {
        Answer::Ack => json!({"type": types::ACK, MESSAGE_ID: id}),
        Answer::Reply(payload) => json!({"type": types::REPLY, MESSAGE_ID: id, "payload": payload}),
        Answer::Nack(reason) => json!({"type": types::NACK, MESSAGE_ID: id, "reason": reason}),
    };
    frame.to_string()
}

/// What the client knows of a message id.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Delivery {
    /// Never seen (or forgotten): handle it.
    New,
    /// Its handler is still running: the answer will follow; do nothing now.
    InProgress,
    /// Answered already: re-send this frame, do not handle it again.
    Answered(String),
}

/// The newest message ids a client has seen, with their answer once given: a bounded memory
/// (oldest forgotten first) that lives as long as the client, across reconnects.
#[derive(Debug)]
pub(super) struct Seen {
    capacity: usize,
    /// `None` while the handler runs, then the answer frame.
    answers: HashMap<String, Option<String>>,
    /// Ids in the order first seen; holds exactly the keys of `answers`.
    order: VecDeque<String>,
}

impl Seen {
    /// Remembers at most `capacity` ids (at least one).
    pub(super) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Seen {
            capacity,
            answers: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// A delivery of `id`: what to do with it. A new id is remembered (as in progress),
    /// forgetting the oldest one when full.
    pub(super) fn deliver(&mut self, id: &str) -> Delivery {
        if let Some(answer) = self.answers.get(id) {
            return match answer {
                Some(frame) => Delivery::Answered(frame.clone()),
                None => Delivery::InProgress,
            };
        }
        while self.order.len() >= self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.answers.remove(&oldest);
            }
        }
        self.order.push_back(id.to_string());
        self.answers.insert(id.to_string(), None);
        Delivery::New
    }

    /// Keeps the answer to `id` for a re-delivery (unless `id` was forgotten meanwhile: then
    /// a re-delivery is handled as new, as it would be after any forgetting).
    pub(super) fn answered(&mut self, id: &str, frame: &str) {
        if let Some(slot) = self.answers.get_mut(id) {
            *slot = Some(frame.to_string());
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        debug_assert_eq!(self.order.len(), self.answers.len());
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handler_results_map_to_answers() {
        assert_eq!(().into_answer(), Answer::Ack);
        assert_eq!(
            Ok::<_, String>(Some(json!({"x": 1}))).into_answer(),
            Answer::Reply(json!({"x": 1}))
        );
        assert_eq!(Ok::<Option<Value>, String>(None).into_answer(), Answer::Ack);
        assert_eq!(Ok::<(), String>(()).into_answer(), Answer::Ack);
        assert_eq!(
            Err::<Option<Value>, _>("disk full").into_answer(),
            Answer::Nack("disk full".into())
        );
        assert_eq!(
            Err::<(), _>(std::fmt::Error).into_answer(),
            Answer::Nack(std::fmt::Error.to_string())
        );
        assert_eq!(
            Answer::Nack("no".into()).into_answer(),
            Answer::Nack("no".into())
        );
    }

    #[test]
    fn answer_frames_quote_the_id() {
        let frame = |a| serde_json::from_str::<Value>(&answer_frame("m1", a)).unwrap();
        assert_eq!(
            frame(Answer::Ack),
            json!({"type": "connection.ack", "messageId": "m1"})
        );
        assert_eq!(
            frame(Answer::Reply(json!([1, null]))),
            json!({"type": "connection.reply", "messageId": "m1", "payload": [1, null]})
        );
        assert_eq!(
            frame(Answer::Reply(Value::Null)),
            json!({"type": "connection.reply", "messageId": "m1", "payload": null})
        );
        assert_eq!(
            frame(Answer::Nack("bad \"input\"".into())),
            json!({"type": "connection.nack", "messageId": "m1", "reason": "bad \"input\""})
        );
    }

    #[test]
    fn only_application_messages_with_a_sane_id_are_tracked() {
        let m = json!({"type": "agent.ping", "messageId": "m1"});
        assert_eq!(tracked_id(&m, "agent.ping").as_deref(), Some("m1"));
        assert_eq!(message_id(&m), Some("m1"));
        let untracked = json!({"type": "agent.ping"});
        assert_eq!(tracked_id(&untracked, "agent.ping"), None);
        assert_eq!(message_id(&untracked), None);
        let error = json!({"type": "connection.error", "messageId": "m1"});
        assert_eq!(tracked_id(&error, "connection.error"), None);
        for bad in [
            json!(""),
            json!(7),
            json!("x".repeat(MAX_MESSAGE_ID_LEN + 1)),
        ] {
            let m = json!({"type": "agent.ping", "messageId": bad});
            assert_eq!(tracked_id(&m, "agent.ping"), None, "{bad}");
        }
        let longest = "x".repeat(MAX_MESSAGE_ID_LEN);
        let m = json!({"type": "agent.ping", "messageId": longest});
        assert!(tracked_id(&m, "agent.ping").is_some());
    }

    #[test]
    fn a_duplicate_is_not_handled_twice_and_gets_the_first_answer() {
        let mut seen = Seen::new(8);
        assert_eq!(seen.deliver("a"), Delivery::New);
        // Re-delivered while the handler runs: nothing to do, the answer follows.
        assert_eq!(seen.deliver("a"), Delivery::InProgress);
        let frame = answer_frame("a", Answer::Reply(json!({"x": 1})));
        seen.answered("a", &frame);
        // Re-delivered after the answer: the same answer again, however often.
        assert_eq!(seen.deliver("a"), Delivery::Answered(frame.clone()));
        assert_eq!(seen.deliver("a"), Delivery::Answered(frame));
        assert_eq!(seen.deliver("b"), Delivery::New);
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn the_memory_is_bounded_and_forgets_the_oldest_first() {
        let mut seen = Seen::new(3);
        for id in ["a", "b", "c"] {
            assert_eq!(seen.deliver(id), Delivery::New);
            seen.answered(id, id);
        }
        assert_eq!(seen.deliver("d"), Delivery::New);
        assert_eq!(seen.len(), 3);
        // `a` was forgotten; `b`..`d` are remembered.
        assert_eq!(seen.deliver("b"), Delivery::Answered("b".into()));
        assert_eq!(seen.deliver("d"), Delivery::InProgress);
        // An answer for a forgotten id is not kept (and does not grow the memory).
        seen.answered("zz", "zz");
        assert_eq!(seen.len(), 3);
        assert_eq!(seen.deliver("a"), Delivery::New);
        assert_eq!(seen.len(), 3);
        assert_eq!(
            seen.deliver("b"),
            Delivery::New,
            "forgotten when `a` came back"
        );
        for n in 0..10_000 {
            seen.deliver(&n.to_string());
        }
        assert_eq!(seen.len(), 3);
        assert_eq!(Seen::new(0).capacity, 1);
    }
}
