//! Which device message types are uplink: accepted from devices for the operators (published
//! on the event stream, the last few kept per client) instead of refused as unknown.

/// Uplink type patterns: `agent.pong` (exactly that type), `telemetry.*` (every type of the
/// `telemetry` provider, at any depth) or `*` (every type no built-in provider handles).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkTypes {
    exact: Vec<String>,
    /// Prefixes ending in `.` (from `provider.*`).
    prefixes: Vec<String>,
    any: bool,
}

/// The built-in agent's messages (`agent.pong` and whatever else it reports): always uplink,
/// whatever else is configured.
pub const DEFAULT_PATTERNS: &[&str] = &["agent.*"];

/// A pattern is not `type`, `prefix.*` or `*`.
#[derive(Debug, thiserror::Error)]
#[error("'{0}' is not an uplink type pattern (a message type, 'provider.*' or '*')")]
pub struct PatternError(String);

impl Default for UplinkTypes {
    fn default() -> Self {
        Self::parse(DEFAULT_PATTERNS.iter().copied()).unwrap_or(Self {
            exact: Vec::new(),
            prefixes: Vec::new(),
            any: false,
        })
    }
}

impl UplinkTypes {
    /// No uplink types.
    pub fn none() -> Self {
        Self {
            exact: Vec::new(),
            prefixes: Vec::new(),
            any: false,
        }
    }

    pub fn parse<'a>(patterns: impl IntoIterator<Item = &'a str>) -> Result<Self, PatternError> {
        let mut t = Self::none();
        for p in patterns {
            let p = p.trim();
            if p.is_empty() {
                continue;
            }
            if p == "*" {
                t.any = true;
            } else if let Some(prefix) = p.strip_suffix(".*") {
                morrigan_protocol::MessageType::parse(&format!("{prefix}.x"))
                    .map_err(|_| PatternError(p.to_string()))?;
                t.prefixes.push(format!("{prefix}."));
            } else {
                morrigan_protocol::MessageType::parse(p)
                    .map_err(|_| PatternError(p.to_string()))?;
                t.exact.push(p.to_string());
            }
        }
        Ok(t)
    }

    /// Whether `message_type` (a valid type) is uplink.
    pub fn matches(&self, message_type: &str) -> bool {
        self.any
            || self.exact.iter().any(|e| e == message_type)
            || self.prefixes.iter().any(|p| message_type.starts_with(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_types_and_providers() {
        let t = UplinkTypes::parse(["agent.*", "telemetry.cpu"]).unwrap();
        assert!(t.matches("agent.pong"));
        assert!(t.matches("agent.exec.done"));
        assert!(!t.matches("agentx.pong"));
        assert!(t.matches("telemetry.cpu"));
        assert!(!t.matches("telemetry.mem"));
        assert!(UplinkTypes::parse(["*"]).unwrap().matches("x.y"));
        assert!(UplinkTypes::default().matches("agent.pong"));
        assert!(UplinkTypes::parse(["not a type"]).is_err());
        assert!(UplinkTypes::parse(["bad prefix.*"]).is_err());
    }
}
