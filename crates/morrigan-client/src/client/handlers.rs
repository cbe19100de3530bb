//! Message handlers registered on the builder: lookup by type, then by provider, then the
//! catch-all, and the capability report they imply.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use morrigan_protocol::MessageType;
use morrigan_protocol::message::Capability;
use serde_json::Value;

use super::Sender;
use super::tracked::{Answer, HandlerResult};

/// A running handler: what it answers once done.
pub(super) type BoxFuture = Pin<Box<dyn Future<Output = Answer> + Send>>;
pub(super) type HandlerFn = Arc<dyn Fn(Value, Sender) -> BoxFuture + Send + Sync>;

#[derive(Default)]
pub(super) struct Handlers {
    pub(super) by_type: HashMap<String, HandlerFn>,
    pub(super) by_provider: HashMap<String, HandlerFn>,
    /// For every application message that has no handler of its own.
    pub(super) other: Option<HandlerFn>,
}

impl Handlers {
    /// The handler for a full type, else for its provider, else the catch-all (never for the
    /// server's own `connection.*` messages).
    pub(super) fn find(&self, ty: &str) -> Option<&HandlerFn> {
        self.by_type
            .get(ty)
            .or_else(|| {
                let provider = MessageType::parse(ty).ok()?.provider();
                self.by_provider.get(provider)
            })
            .or_else(|| {
                if ty.starts_with("connection.") {
                    None
                } else {
                    self.other.as_ref()
                }
            })
    }
}

/// A handler as the client stores it: its result turned into an [`Answer`].
pub(super) fn boxed<F, Fut>(handler: F) -> HandlerFn
where
    F: Fn(Value, Sender) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: HandlerResult,
{
    Arc::new(move |message, sender| {
        let run = handler(message, sender);
        Box::pin(async move { run.await.into_answer() }) as BoxFuture
    })
}

/// The capability report: explicit entries, merged with one entry per provider that has
/// handlers (listing the message names of its type handlers).
pub(super) fn capability_report(handlers: &Handlers, explicit: Vec<Capability>) -> Vec<Capability> {
    let mut report: BTreeMap<String, Capability> = BTreeMap::new();
    for capability in explicit {
        report.insert(capability.name.clone(), capability);
    }
    for provider in handlers.by_provider.keys() {
        report
            .entry(provider.clone())
            .or_insert_with(|| Capability {
                name: provider.clone(),
                ..Capability::default()
            });
    }
    for ty in handlers.by_type.keys() {
        let Ok(parsed) = MessageType::parse(ty) else {
            continue;
        };
        let entry = report
            .entry(parsed.provider().to_string())
            .or_insert_with(|| Capability {
                name: parsed.provider().to_string(),
                ..Capability::default()
            });
        if !entry.messages.iter().any(|m| m == parsed.message()) {
            entry.messages.push(parsed.message().to_string());
        }
    }
    let mut report: Vec<Capability> = report.into_values().collect();
    for capability in &mut report {
        capability.messages.sort();
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn noop(_: Value, _: Sender) -> std::future::Ready<()> {
        std::future::ready(())
    }

    #[test]
    fn capability_report_merges_handlers_and_explicit_entries() {
        let mut handlers = Handlers::default();
        handlers.by_type.insert("agent.ping".into(), boxed(noop));
        handlers
            .by_type
            .insert("agent.exec.run".into(), boxed(noop));
        handlers.by_type.insert("files.get".into(), boxed(noop));
        handlers.by_provider.insert("logs".into(), boxed(noop));
        let explicit = vec![Capability {
            name: "agent".into(),
            version: "1.2.0".into(),
            ..Capability::default()
        }];
        let report = capability_report(&handlers, explicit);
        let value = serde_json::to_value(&report).unwrap();
        assert_eq!(
            value,
            json!([
                {"name": "agent", "version": "1.2.0", "messages": ["exec.run", "ping"]},
                {"name": "files", "version": "", "messages": ["get"]},
                {"name": "logs", "version": "", "messages": []},
            ])
        );
    }

    #[test]
    fn handler_lookup_prefers_the_full_type() {
        let mut handlers = Handlers::default();
        handlers.by_type.insert("agent.ping".into(), boxed(noop));
        handlers.by_provider.insert("agent".into(), boxed(noop));
        let full = handlers.find("agent.ping").map(Arc::as_ptr);
        let provider = handlers.find("agent.other").map(Arc::as_ptr);
        assert!(full.is_some() && provider.is_some());
        assert_ne!(full, provider);
        assert!(handlers.find("other.ping").is_none());
        // The catch-all takes the rest, but never the server's own messages.
        handlers.other = Some(boxed(noop));
        let other = handlers.find("other.ping").map(Arc::as_ptr);
        assert!(other.is_some());
        assert_ne!(other, full);
        assert_ne!(other, provider);
        assert!(handlers.find("connection.error").is_none());
    }
}
