//! What this node knows of the other nodes of its cluster, so that a dead or frozen one costs a
//! caller nothing (see [`crate::delivery`]).

use std::time::Duration;

/// How long a node that did not acknowledge a command is treated as unreachable without
/// asking it again.
const UNREACHABLE_FOR: Duration = Duration::from_secs(5);

/// What this node knows of the other nodes, so that a dead or frozen one costs a caller nothing:
/// the leases read from the store (refreshed with this node's own lease), and the nodes that
/// recently did not acknowledge a command.
#[derive(Default)]
pub struct Peers {
    /// Node id → (state, lease expiry), as of the last refresh.
    leases: std::sync::RwLock<std::collections::HashMap<String, (String, String)>>,
    unreachable: dashmap::DashMap<String, tokio::time::Instant>,
}

impl Peers {
    /// Replaces the lease table with `nodes` (read from the store).
    pub fn refresh(&self, nodes: &[crate::store::NodeRow]) {
        let table = nodes
            .iter()
            .map(|n| (n.id.clone(), (n.state.clone(), n.lease_expires.clone())))
            .collect();
        if let Ok(mut leases) = self.leases.write() {
            *leases = table;
        }
        let now = tokio::time::Instant::now();
        self.unreachable.retain(|_, until| *until > now);
    }

    /// Whether `node` may be asked: not known to be stopped, lost or past its lease, and not
    /// recently silent. A node not yet in the table is asked.
    pub fn reachable(&self, node: &str) -> bool {
        if self
            .unreachable
            .get(node)
            .is_some_and(|until| *until > tokio::time::Instant::now())
        {
            return false;
        }
        let now = morrigan_protocol::time_format::now();
        match self.leases.read() {
            Ok(leases) => match leases.get(node) {
                Some((state, expires)) => state == "running" && *expires > now,
                None => true,
            },
            Err(_) => true,
        }
    }

    /// `node` did not acknowledge a command.
    pub(crate) fn silent(&self, node: &str) {
        if self.unreachable.len() < MAX_SILENT {
            self.unreachable.insert(
                node.to_string(),
                tokio::time::Instant::now() + UNREACHABLE_FOR,
            );
        }
    }
}

/// Most nodes remembered as silent (bounded: node names come from records and the bus).
const MAX_SILENT: usize = 100_000;
