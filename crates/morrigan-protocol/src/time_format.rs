//! Timestamps on the wire are ISO 8601 / RFC 3339 strings in UTC with millisecond precision
//! (`2026-11-26T10:15:56.792Z`). One fixed width means the strings also sort chronologically,
//! which the stores rely on.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Formats a timestamp as `YYYY-MM-DDTHH:MM:SS.mmmZ` (years outside 0..=9999 are clamped to
/// it: the width is what keeps the strings sortable). Written digit by digit: every tracked
/// message and connection record takes a few, and `format!` cost several times as much.
pub fn format(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let mut out = [0u8; 24];
    let year = t.year().clamp(0, 9999) as u32;
    let fields: [(usize, u32, usize); 7] = [
        (0, year, 4),
        (5, u32::from(u8::from(t.month())), 2),
        (8, u32::from(t.day()), 2),
        (11, u32::from(t.hour()), 2),
        (14, u32::from(t.minute()), 2),
        (17, u32::from(t.second()), 2),
        (20, u32::from(t.millisecond()), 3),
    ];
    for (at, mut value, width) in fields {
        for i in (0..width).rev() {
            out[at + i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    for (at, sep) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (23, b'Z'),
    ] {
        out[at] = sep;
    }
    out.iter().map(|&b| char::from(b)).collect()
}

/// The current time, formatted.
pub fn now() -> String {
    format(OffsetDateTime::now_utc())
}

/// Parses any RFC 3339 timestamp (the original wrote offsets such as `+00:00`).
pub fn parse(s: &str) -> Result<OffsetDateTime, time::error::Parse> {
    OffsetDateTime::parse(s, &Rfc3339)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_width_utc_round_trip() {
        let t = parse("2026-11-26T10:15:56.792+02:00").unwrap();
        assert_eq!(format(t), "2026-11-26T08:15:56.792Z");
        assert_eq!(parse(&format(t)).unwrap(), t);
        let t = parse("0999-01-02T03:04:05.006Z").unwrap();
        assert_eq!(format(t), "0999-01-02T03:04:05.006Z");
    }
}
