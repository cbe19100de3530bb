//! The connection provider describes the connection endpoints and takes a device's answers to
//! tracked messages (`connection.ack`, `connection.reply`, `connection.nack`, see
//! [`crate::messaging`]). Any other `connection.<anything>` message gets `connection.error`
//! `unknownMessage` and the connection stays open (the original server crashed on one).

use async_trait::async_trait;
use serde_json::Value;

use super::{HandlerError, MessageContext, Provider};
use crate::auth::functions;

pub struct ConnectionProvider;

#[async_trait]
impl Provider for ConnectionProvider {
    fn name(&self) -> &str {
        "connection"
    }
    fn messages(&self) -> Vec<String> {
        ["ack", "reply", "nack"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }
    fn endpoints(&self) -> Vec<String> {
        [
            "POST /",
            "GET /",
            "WS /connect",
            "GET /:connectionId",
            "POST /:connectionId/send",
            "DELETE /:connectionId",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
    fn functions(&self) -> Vec<String> {
        [
            functions::API,
            functions::CONNECTION,
            functions::CONNECTION_SEND,
            functions::CONNECTION_CLOSE,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
    async fn handle(
        &self,
        ctx: &MessageContext,
        message: &str,
        body: Value,
    ) -> Result<Option<Value>, HandlerError> {
        use crate::messaging::AnswerError;
        match ctx
            .services
            .tracker
            .answer(&ctx.client_id, message, &body)
            .await
        {
            Ok(()) => Ok(None),
            Err(AnswerError::UnknownMessage) => Err(HandlerError::UnknownMessage),
            Err(AnswerError::Invalid(reason)) => Err(HandlerError::Invalid(reason)),
            Err(AnswerError::UnknownId(reason)) => Err(HandlerError::UnknownId(reason)),
            Err(AnswerError::Store(e)) => Err(e.into()),
        }
    }
}
