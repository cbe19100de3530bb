//! The capability provider: a valid `capability.report` (at most [`MAX_ENTRIES`] entries) replaces
//! the capabilities stored on the client record, which `GET /api/core/capability/:clientId`
//! serves; an invalid one, or one from a client no longer provisioned, is answered with
//! `connection.error` and stores nothing.

use async_trait::async_trait;
use morrigan_protocol::message::Capability;
use morrigan_protocol::time_format;
use serde_json::Value;

use super::{HandlerError, MessageContext, Provider};

/// Most capability entries stored per client.
pub const MAX_ENTRIES: usize = 256;

pub struct CapabilityProvider;

#[async_trait]
impl Provider for CapabilityProvider {
    fn name(&self) -> &str {
        "capability"
    }
    fn messages(&self) -> Vec<String> {
        vec!["report".into()]
    }
    fn endpoints(&self) -> Vec<String> {
        vec!["GET /".into(), "GET /:clientId".into()]
    }
    fn functions(&self) -> Vec<String> {
        vec![crate::auth::functions::API.to_string()]
    }
    async fn handle(
        &self,
        ctx: &MessageContext,
        message: &str,
        mut body: Value,
    ) -> Result<Option<Value>, HandlerError> {
        if message != "report" {
            return Err(HandlerError::UnknownMessage);
        }
        let raw = body
            .get_mut("capabilities")
            .map(Value::take)
            .ok_or_else(|| HandlerError::Invalid("'capabilities' must be an array".into()))?;
        let caps: Vec<Capability> = serde_json::from_value(raw).map_err(|e| {
            HandlerError::Invalid(format!(
                "'capabilities' must be an array of {{name, version, messages}}: {e}"
            ))
        })?;
        if caps.len() > MAX_ENTRIES {
            return Err(HandlerError::Invalid(format!(
                "at most {MAX_ENTRIES} capabilities"
            )));
        }
        let text = serde_json::to_string(&caps).map_err(|e| HandlerError::Failed(e.to_string()))?;
        for c in &caps {
            tracing::debug!(client = %ctx.client_id, name = %c.name, version = %c.version, messages = c.messages.len(), "capability reported");
        }
        if !ctx
            .services
            .store
            .set_capabilities(&ctx.client_id, &text, &time_format::now())
            .await?
        {
            return Err(HandlerError::Invalid(
                "client is no longer provisioned".into(),
            ));
        }
        Ok(None)
    }
}
