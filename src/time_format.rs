//! RFC 3339 times: written in JSON output, read from API queries and CLI flags (one
//! parser for both, so both accept the same spellings).

use std::time::{Duration, SystemTime};

/// Writes a time as RFC 3339 with microseconds, in UTC.
pub fn serialize<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*time))
}

/// The same for optional times (`null` when absent).
pub mod option {
    use std::time::SystemTime;

    /// Writes the time as [`super::serialize`] does, or `null`.
    pub fn serialize<S: serde::Serializer>(
        time: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match time {
            Some(time) => super::serialize(time, s),
            None => s.serialize_none(),
        }
    }
}

/// Parses an RFC 3339 date-time: `YYYY-MM-DDTHH:MM:SS[.frac]` followed by `Z` or a
/// numeric offset `±HH:MM` (required, as RFC 3339 requires it). `T` may also be `t` or
/// a space; a space before the offset is read as `+` (what an unencoded `+` in a query
/// string becomes). Returns `None` for anything else, or for a time before 1970.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    // `local` is the date-time without its offset; `offset` is east of UTC.
    let (local, offset_secs) = if let Some(local) = text.strip_suffix(['Z', 'z']) {
        (local, 0i64)
    } else {
        let split = text.len().checked_sub(6)?;
        let (local, offset) = (text.get(..split)?, text.get(split..)?.as_bytes());
        let sign = match offset[0] {
            // An unencoded `+` in a query string arrives as a space.
            b'+' | b' ' => 1,
            b'-' => -1,
            _ => return None,
        };
        if offset[3] != b':' {
            return None;
        }
        let two = |a: u8, b: u8| -> Option<i64> {
            (a.is_ascii_digit() && b.is_ascii_digit())
                .then(|| i64::from(a - b'0') * 10 + i64::from(b - b'0'))
        };
        let (hours, minutes) = (two(offset[1], offset[2])?, two(offset[4], offset[5])?);
        if hours > 23 || minutes > 59 {
            return None;
        }
        (local, sign * (hours * 3600 + minutes * 60))
    };
    // humantime reads the rest as UTC; it accepts `T` or a space at index 10.
    let bytes = local.as_bytes();
    if bytes.len() < 19 || !matches!(bytes[10], b'T' | b't' | b' ') {
        return None;
    }
    if bytes.len() > 19 && bytes[19] != b'.' {
        return None;
    }
    let normalized = format!("{}T{}", local.get(..10)?, local.get(11..)?);
    let as_utc = humantime::parse_rfc3339_weak(&normalized).ok()?;
    let shift = Duration::from_secs(offset_secs.unsigned_abs());
    if offset_secs >= 0 {
        as_utc.checked_sub(shift)
    } else {
        as_utc.checked_add(shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn rfc3339_with_offsets() {
        // 2025-01-31T12:00:00Z
        let noon = at(1_738_324_800);
        for text in [
            "2025-01-31T12:00:00Z",
            "2025-01-31t12:00:00z",
            "2025-01-31 12:00:00Z",
            "2025-01-31T13:00:00+01:00",
            "2025-01-31T06:30:00-05:30",
            "2025-01-31T12:00:00+00:00",
            "2025-01-31T12:00:00-00:00",
            "2025-01-31T13:00:00 01:00",
        ] {
            assert_eq!(parse_rfc3339(text), Some(noon), "{text}");
        }
        assert_eq!(
            parse_rfc3339("2025-01-31T12:00:00.250Z"),
            Some(noon + Duration::from_millis(250))
        );
        for bad in [
            "",
            "yesterday",
            "2025-01-31",
            "2025-01-31T12:00:00",
            "2025-01-31T12:00:00+0100",
            "2025-01-31T12:00:00+24:00",
            "2025-13-31T12:00:00Z",
            "2025-01-31T25:00:00Z",
            "2025-01-31T12:00:00xZ",
            "2025-01-31X12:00:00Z",
            "1969-12-31T23:59:59Z",
            "2025-01-31T12:00:00ñ1:00",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }
}
