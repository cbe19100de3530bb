//! Failed-login throttling, per source address and per identity name.
//!
//! * **Per address** (IPv6 by /64, the block one host usually holds): [`FREE_PER_ADDRESS`]
//!   failures are free; after that, each failure makes the next attempt from the address wait
//!   [`FIRST_DELAY`], doubled per further failure up to [`MAX_DELAY`]. Past the free failures,
//!   one attempt at a time.
//! * **Per name** (across all addresses, known or not, so a refusal tells nothing about which
//!   names exist): the same with [`FREE_PER_NAME`] free failures. It applies only to addresses
//!   with a failure in the last [`FORGET_AFTER`] or an attempt in progress: an address that has
//!   not failed is checked. So the real operator logging in from elsewhere is never locked out
//!   by someone guessing their name, and a guesser spreading over many addresses gets one
//!   guess per fresh address (each failure also lengthens the name's delay).
//!
//! A throttled attempt is refused before anything is read or hashed. A success from an
//! address restores its free failures, but the address stays subject to the per-name delay
//! until its failures are forgotten (so logging in to one's own account does not buy more
//! guesses at another). A record is forgotten [`FORGET_AFTER`] after its last failure.
//!
//! The tables are in memory, per node (a cluster of N nodes allows up to N times the free
//! failures; every further attempt on a node still waits). Each holds at most [`MAX_ENTRIES`]
//! records: when full, forgotten records are swept, then the least recently failed eighth is
//! dropped.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::ApiError;

/// Failures an address may make before its attempts are delayed.
pub const FREE_PER_ADDRESS: u32 = 5;
/// Failures a name may take, across all addresses, before attempts on it are delayed.
pub const FREE_PER_NAME: u32 = 10;
/// The delay after the first failure past the free ones; it doubles with each further one.
pub const FIRST_DELAY: Duration = Duration::from_secs(1);
/// The longest delay.
pub const MAX_DELAY: Duration = Duration::from_secs(300);
/// A record is forgotten this long after its last failure.
pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// The most records per table (addresses, names).
pub const MAX_ENTRIES: usize = 65_536;

/// Why an attempt is refused, and for how many more seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttled {
    Address(u64),
    Name(u64),
}

impl From<Throttled> for ApiError {
    fn from(t: Throttled) -> Self {
        let (what, seconds) = match t {
            Throttled::Address(s) => ("from this address", s),
            Throttled::Name(s) => ("for this identity", s),
        };
        ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "throttled",
            format!("Too many failed logins {what}; retry in {seconds} s."),
        )
        .retry_after(seconds)
    }
}

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    in_flight: u32,
    /// No attempt before this.
    until: Option<Instant>,
    last_failure: Option<Instant>,
}

impl Record {
    const NEW: Record = Record {
        failures: 0,
        in_flight: 0,
        until: None,
        last_failure: None,
    };

    fn forgotten(&self, now: Instant) -> bool {
        self.in_flight == 0
            && self
                .last_failure
                .is_none_or(|at| now.saturating_duration_since(at) >= FORGET_AFTER)
    }

    /// Seconds to wait, if an attempt now is refused.
    fn refusal(&self, free: u32, now: Instant) -> Option<u64> {
        if let Some(until) = self.until.filter(|u| *u > now) {
            let left = until - now;
            return Some(left.as_secs() + u64::from(left.subsec_nanos() > 0));
        }
        // Past the free failures, one attempt at a time.
        (self.failures + self.in_flight >= free && self.in_flight > 0).then_some(1)
    }

    fn fail(&mut self, free: u32, now: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.failures = self.failures.saturating_add(1);
        self.last_failure = Some(now);
        if self.failures >= free {
            let doublings = (self.failures - free).min(16);
            let delay = FIRST_DELAY.saturating_mul(1 << doublings).min(MAX_DELAY);
            self.until = Some(now + delay);
        }
    }
}

struct Table<K> {
    records: HashMap<K, Record>,
    free: u32,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new(free: u32) -> Self {
        Self {
            records: HashMap::new(),
            free,
        }
    }

    /// The live record of `key`, forgetting it if it is due.
    fn get(&mut self, key: &K, now: Instant) -> Option<Record> {
        let record = *self.records.get(key)?;
        if record.forgotten(now) {
            self.records.remove(key);
            return None;
        }
        Some(record)
    }

    fn update(&mut self, key: &K, now: Instant, f: impl FnOnce(&mut Record)) {
        if !self.records.contains_key(key) && self.records.len() >= MAX_ENTRIES {
            self.make_room(now);
        }
        let record = self.records.entry(key.clone()).or_insert(Record::NEW);
        f(record);
        if record.failures == 0 && record.in_flight == 0 && record.last_failure.is_none() {
            self.records.remove(key);
        }
    }

    /// Sweeps forgotten records; if that is not enough, drops the eighth that failed least
    /// recently (never one with an attempt in progress).
    fn make_room(&mut self, now: Instant) {
        self.records.retain(|_, r| !r.forgotten(now));
        if self.records.len() < MAX_ENTRIES {
            return;
        }
        let mut ages: Vec<Instant> = self
            .records
            .values()
            .filter(|r| r.in_flight == 0)
            .filter_map(|r| r.last_failure)
            .collect();
        let Some(cut) = ages.len().checked_sub(1).map(|_| ages.len() / 8) else {
            return;
        };
        let (_, oldest_kept, _) = ages.select_nth_unstable(cut);
        let oldest_kept = *oldest_kept;
        self.records
            .retain(|_, r| r.in_flight > 0 || r.last_failure.is_none_or(|at| at >= oldest_kept));
    }
}

struct Tables {
    addresses: Table<IpAddr>,
    names: Table<String>,
}

/// The node's failed-login records (see the module documentation).
pub struct LoginThrottle {
    tables: Mutex<Tables>,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        Self {
            tables: Mutex::new(Tables {
                addresses: Table::new(FREE_PER_ADDRESS),
                names: Table::new(FREE_PER_NAME),
            }),
        }
    }
}

/// The key of an address: IPv4 as is (also when mapped into IPv6), IPv6 by its /64.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

impl LoginThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits an attempt to log in as `name` from `address`, or says how long to wait. The
    /// attempt counts as in progress until it is reported ([`Attempt::failed`],
    /// [`Attempt::succeeded`]) or dropped (neither: the password was not checked).
    pub fn attempt(&self, address: IpAddr, name: &str) -> Result<Attempt<'_>, Throttled> {
        let address = address_key(address);
        let name = name.to_string();
        let now = Instant::now();
        let mut t = self.lock();
        let by_address = t.addresses.get(&address, now);
        if let Some(wait) = by_address.and_then(|r| r.refusal(t.addresses.free, now)) {
            return Err(Throttled::Address(wait));
        }
        let suspect = by_address.is_some_and(|r| !r.forgotten(now));
        if suspect {
            let by_name = t.names.get(&name, now);
            if let Some(wait) = by_name.and_then(|r| r.refusal(t.names.free, now)) {
                return Err(Throttled::Name(wait));
            }
        }
        t.addresses.update(&address, now, |r| r.in_flight += 1);
        t.names.update(&name, now, |r| r.in_flight += 1);
        Ok(Attempt {
            throttle: self,
            address,
            name,
            reported: false,
        })
    }
}

/// An admitted login attempt (see [`LoginThrottle::attempt`]).
pub struct Attempt<'a> {
    throttle: &'a LoginThrottle,
    address: IpAddr,
    name: String,
    reported: bool,
}

impl Attempt<'_> {
    /// The password was wrong (or the name unknown): both records count a failure.
    pub fn failed(mut self) {
        self.reported = true;
        let now = Instant::now();
        let mut t = self.throttle.lock();
        let free = t.addresses.free;
        t.addresses
            .update(&self.address, now, |r| r.fail(free, now));
        let free = t.names.free;
        t.names.update(&self.name, now, |r| r.fail(free, now));
    }

    /// The password was right: the address gets its free failures back (it stays subject to
    /// the per-name delay until its failures are forgotten).
    pub fn succeeded(mut self) {
        self.reported = true;
        let now = Instant::now();
        let mut t = self.throttle.lock();
        t.addresses.update(&self.address, now, |r| {
            r.in_flight = r.in_flight.saturating_sub(1);
            r.failures = 0;
            r.until = None;
        });
        t.names.update(&self.name, now, |r| {
            r.in_flight = r.in_flight.saturating_sub(1)
        });
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.reported {
            return;
        }
        let now = Instant::now();
        let mut t = self.throttle.lock();
        t.addresses.update(&self.address, now, |r| {
            r.in_flight = r.in_flight.saturating_sub(1);
        });
        t.names.update(&self.name, now, |r| {
            r.in_flight = r.in_flight.saturating_sub(1)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_share_their_64_and_mapped_ipv4_is_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(address_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_full_table_drops_the_oldest_failures_and_keeps_attempts_in_progress() {
        let mut t: Table<u32> = Table::new(FREE_PER_ADDRESS);
        let start = Instant::now();
        t.update(&0, start, |r| r.in_flight = 1);
        for k in 1..MAX_ENTRIES as u32 {
            let at = start + Duration::from_millis(u64::from(k));
            t.update(&k, at, |r| r.fail(FREE_PER_ADDRESS, at));
        }
        assert_eq!(t.records.len(), MAX_ENTRIES);
        let later = start + Duration::from_secs(100);
        t.update(&u32::MAX, later, |r| r.fail(FREE_PER_ADDRESS, later));
        assert!(t.records.len() <= MAX_ENTRIES - MAX_ENTRIES / 8 + 2);
        assert!(t.records.contains_key(&0), "in progress: kept");
        assert!(!t.records.contains_key(&1), "the oldest failure: dropped");
        assert!(t.records.contains_key(&(MAX_ENTRIES as u32 - 1)));
        assert!(t.records.contains_key(&u32::MAX));
        // Forgotten records go first.
        let much_later = later + FORGET_AFTER;
        t.update(&7, much_later, |r| r.in_flight = 1);
        t.make_room(much_later);
        assert_eq!(t.records.len(), 2, "only the attempts in progress remain");
    }

    #[test]
    fn delays_double_from_the_first_past_the_free_failures_up_to_the_cap() {
        let now = Instant::now();
        let mut r = Record::NEW;
        let mut seen = Vec::new();
        for _ in 0..FREE_PER_ADDRESS + 12 {
            r.in_flight += 1;
            r.fail(FREE_PER_ADDRESS, now);
            seen.push(r.refusal(FREE_PER_ADDRESS, now).unwrap_or(0));
        }
        let free = FREE_PER_ADDRESS as usize;
        assert!(seen[..free - 1].iter().all(|s| *s == 0), "{seen:?}");
        assert_eq!(&seen[free - 1..free + 3], &[1, 2, 4, 8], "{seen:?}");
        assert_eq!(*seen.last().unwrap(), MAX_DELAY.as_secs(), "{seen:?}");
    }
}
