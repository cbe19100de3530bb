//! Timestamps on the wire are ISO 8601 / RFC 3339 strings in UTC with millisecond precision
//! (`2026-11-26T10:15:56.792Z`). One fixed width means the strings also sort chronologically,
//! which the stores rely on.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Formats a timestamp as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
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
    }
}
