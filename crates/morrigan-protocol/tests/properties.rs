//! Property tests of what peers control on the wire: message types against their documented
//! grammar, and the timestamp format whose string order the stores rely on.
//!
//! Case counts are modest (the suite runs on two cores); `PROPTEST_CASES` raises them.

use morrigan_protocol::message::{MAX_TYPE_LEN, MessageType, MessageTypeError, is_valid_type};
use morrigan_protocol::time_format;
use proptest::prelude::*;
use time::{OffsetDateTime, UtcOffset};

/// The grammar as documented (crate docs of `message`, ARCHITECTURE.md), independent of the
/// parser: `^[A-Za-z0-9_-]+\.[A-Za-z0-9_.-]+$`, at most 256 bytes.
fn documented(s: &str) -> bool {
    thread_local! {
        static GRAMMAR: regex::Regex =
            regex::Regex::new(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_.-]+$").expect("grammar");
    }
    s.len() <= 256 && GRAMMAR.with(|g| g.is_match(s))
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(cases),
        ..ProptestConfig::default()
    }
}

/// Strings that are mostly near the grammar: its own characters, the ones `[A-z]` would have
/// let in, separators, non-ASCII and control characters, at lengths around the 256-byte bound.
fn near_types() -> impl Strategy<Value = String> {
    let alphabet = prop_oneof![
        8 => prop::sample::select(
            "abcXYZ019_-.".chars().collect::<Vec<_>>()
        ),
        1 => prop::sample::select(
            "[\\]^` \t\n/:\0\u{e4}\u{1F980}\u{200B}".chars().collect::<Vec<_>>()
        ),
    ];
    prop_oneof![
        prop::collection::vec(alphabet.clone(), 0..12).prop_map(|v| v.into_iter().collect()),
        prop::collection::vec(alphabet, 240..270).prop_map(|v| v.into_iter().collect()),
    ]
}

/// Valid types by construction, some exactly at or just over the length bound.
fn valid_types() -> impl Strategy<Value = String> {
    (
        "[A-Za-z0-9_-]{1,16}",
        "[A-Za-z0-9_.-]{1,16}",
        prop::option::of(0usize..20),
    )
        .prop_map(|(provider, message, pad)| match pad {
            None => format!("{provider}.{message}"),
            // Padded to 246..266 bytes: either side of MAX_TYPE_LEN.
            Some(extra) => {
                let len = provider.len() + 1 + message.len();
                let target = 246 + extra;
                format!(
                    "{provider}.{message}{}",
                    "x".repeat(target.saturating_sub(len))
                )
            }
        })
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn message_type_is_accepted_iff_it_matches_the_documented_grammar(
        s in prop_oneof![near_types(), valid_types(), any::<String>()]
    ) {
        let parsed = MessageType::parse(&s);
        prop_assert_eq!(parsed.is_ok(), documented(&s), "{:?} -> {:?}", s, parsed);
        prop_assert_eq!(is_valid_type(&s), documented(&s));
        match parsed {
            Ok(t) => {
                let dot = s.find('.').expect("a valid type has a dot");
                prop_assert_eq!(t.provider(), &s[..dot]);
                prop_assert_eq!(t.message(), &s[dot + 1..]);
                prop_assert!(!t.provider().contains('.'));
                prop_assert!(!t.provider().is_empty() && !t.message().is_empty());
                prop_assert_eq!(t.as_str(), s.as_str());
                prop_assert_eq!(format!("{}.{}", t.provider(), t.message()), s);
            }
            Err(e) => {
                // The reason names what is wrong: emptiness, then length, then the dot that
                // must separate two non-empty parts, then the characters.
                let first_dot = s.find('.');
                let expected = if s.is_empty() {
                    MessageTypeError::Empty
                } else if s.len() > MAX_TYPE_LEN {
                    MessageTypeError::TooLong
                } else if first_dot.is_none_or(|d| d == 0 || d + 1 == s.len()) {
                    MessageTypeError::NoDot
                } else {
                    MessageTypeError::BadCharacter
                };
                prop_assert_eq!(e, expected, "{:?}", s);
            }
        }
    }
}

/// First and last instants of the fixed-width domain: years 0000 to 9999, UTC.
const MIN_SECS: i64 = -62_167_219_200; // 0000-01-01T00:00:00Z
const MAX_SECS: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z

/// An instant in the fixed-width domain, with nanoseconds (the format keeps milliseconds).
fn instant() -> impl Strategy<Value = OffsetDateTime> {
    let nanos =
        (MIN_SECS as i128 * 1_000_000_000)..=(MAX_SECS as i128 * 1_000_000_000 + 999_999_999);
    // Mostly the years devices live in, sometimes anywhere in the domain, and pairs that are
    // close together (the same second, or milliseconds apart).
    let recent = (1_500_000_000i128 * 1_000_000_000)..(4_000_000_000i128 * 1_000_000_000);
    prop_oneof![3 => recent, 1 => nanos]
        .prop_map(|n| OffsetDateTime::from_unix_timestamp_nanos(n).expect("in range"))
}

/// The instant as the format keeps it: milliseconds, UTC.
fn to_millis(t: OffsetDateTime) -> i128 {
    t.unix_timestamp_nanos().div_euclid(1_000_000)
}

fn shape_ok(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn timestamps_are_fixed_width_and_round_trip(t in instant(), offset_minutes in -900i32..=900) {
        let s = time_format::format(t);
        prop_assert!(shape_ok(&s), "{}", s);
        let back = time_format::parse(&s).expect("the format parses");
        prop_assert_eq!(to_millis(back), to_millis(t), "{}", s);
        prop_assert_eq!(back.offset(), UtcOffset::UTC);
        // Formatting again is the identity: nothing is lost a second time.
        prop_assert_eq!(time_format::format(back), s.clone());
        // The same instant seen at another offset formats the same (always UTC), as long as
        // that local time exists in the supported range.
        let offset = UtcOffset::from_whole_seconds(offset_minutes * 60).expect("offset");
        if let Some(local) = t.checked_to_offset(offset) {
            prop_assert_eq!(time_format::format(local), s);
        }
    }

    #[test]
    fn string_order_is_time_order(a in instant(), gap_ms in prop_oneof![0i64..3, 0i64..2_000, any::<i64>()], b in instant()) {
        // A far pair and a near pair (a, a + gap): both must compare as their instants do.
        let near = a
            .checked_add(time::Duration::milliseconds(gap_ms % 10_000_000))
            .filter(|n| n.unix_timestamp() >= MIN_SECS && n.unix_timestamp() <= MAX_SECS);
        for other in [Some(b), near].into_iter().flatten() {
            let (sa, so) = (time_format::format(a), time_format::format(other));
            prop_assert_eq!(
                sa.cmp(&so),
                to_millis(a).cmp(&to_millis(other)),
                "{} vs {}", sa, so
            );
        }
    }

    #[test]
    fn parsing_arbitrary_text_never_panics(
        s in prop_oneof![
            any::<String>(),
            "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})",
        ]
    ) {
        if let Ok(t) = time_format::parse(&s) {
            // Whatever parses is a real instant: formatting it (when its UTC time is in the
            // domain) gives the same instant back.
            let utc = t.checked_to_offset(UtcOffset::UTC);
            if let Some(utc) = utc.filter(|u| (0..=9999).contains(&u.year())) {
                let back = time_format::parse(&time_format::format(utc)).expect("parses");
                prop_assert_eq!(to_millis(back), to_millis(t));
            }
        }
    }
}
