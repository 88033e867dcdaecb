//! Times: written in JSON output and request bodies, read from API queries and CLI flags
//! (one parser for both, so both accept the same spellings), and read from PostgreSQL as
//! it stores them.
//!
//! Writing never fails and never panics: every time PostgreSQL can store has a spelling
//! (humantime's RFC 3339 formatter panics before 1970 and after 9999, which a hand-made
//! `created_at` reached).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postgres_types::{FromSql, Type};

/// Microseconds from the Unix epoch to PostgreSQL's, 2000-01-01 00:00:00 UTC.
const PG_EPOCH_MICROS: i128 = 946_684_800_000_000;

/// A `timestamptz` exactly as PostgreSQL stores it: microseconds since 2000-01-01 UTC,
/// with `i64::MAX` and `i64::MIN` for `infinity` and `-infinity`. Every stored value
/// reads into one, from 4714 BC to 294276 AD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// `infinity`.
    pub const INFINITY: Self = Self(i64::MAX);
    /// `-infinity`.
    pub const NEG_INFINITY: Self = Self(i64::MIN);

    /// The same instant; times beyond PostgreSQL's range become its infinities (which
    /// is also how tokio-postgres reads those into a `SystemTime`, so they round-trip).
    pub fn from_system_time(time: SystemTime) -> Self {
        let unix = match time.duration_since(UNIX_EPOCH) {
            Ok(after) => after.as_micros() as i128,
            // Rounded down, as PostgreSQL's own microseconds are.
            Err(before) => -(before.duration().as_nanos().div_ceil(1_000) as i128),
        };
        let micros = (unix - PG_EPOCH_MICROS).clamp(i64::MIN as i128, i64::MAX as i128);
        Self(micros as i64)
    }

    /// The same instant as a `SystemTime` (the infinities as the farthest instants
    /// PostgreSQL's encoding names, as tokio-postgres reads them).
    pub fn to_system_time(self) -> SystemTime {
        let unix = i128::from(self.0) + PG_EPOCH_MICROS;
        let span = Duration::from_micros(unix.unsigned_abs().min(u128::from(u64::MAX)) as u64);
        let time = if unix >= 0 {
            UNIX_EPOCH.checked_add(span)
        } else {
            UNIX_EPOCH.checked_sub(span)
        };
        time.unwrap_or(UNIX_EPOCH)
    }
}

/// RFC 3339 in UTC with microseconds (`2026-01-01T00:00:00.123456Z`) for years 0000 to
/// 9999; beyond them ISO 8601's expanded years (`+10000-01-01T…`, `-0001-…`, with year
/// 0000 for 1 BC as ISO 8601 counts); `infinity` and `-infinity` as PostgreSQL writes
/// them.
impl std::fmt::Display for PgTimestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::INFINITY => return f.write_str("infinity"),
            Self::NEG_INFINITY => return f.write_str("-infinity"),
            _ => {}
        }
        let unix = i128::from(self.0) + PG_EPOCH_MICROS;
        let (secs, micros) = (unix.div_euclid(1_000_000), unix.rem_euclid(1_000_000));
        let (days, second_of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        // |days| < 2^40 for any i64 of microseconds.
        let (year, month, day) = civil_from_days(days as i64);
        match year {
            0..=9999 => write!(f, "{year:04}")?,
            10_000.. => write!(f, "+{year}")?,
            _ => write!(f, "-{:04}", year.unsigned_abs())?,
        }
        write!(
            f,
            "-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
            second_of_day / 3_600,
            second_of_day / 60 % 60,
            second_of_day % 60
        )
    }
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`): exact for any day, in astronomical years (year 0 is 1 BC).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl<'a> FromSql<'a> for PgTimestamp {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let raw: [u8; 8] = raw.try_into()?;
        Ok(Self(i64::from_be_bytes(raw)))
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::TIMESTAMPTZ | Type::TIMESTAMP)
    }
}

/// Writes a time as [`PgTimestamp`] does: RFC 3339 with microseconds, in UTC.
pub fn serialize<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&PgTimestamp::from_system_time(*time))
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
    fn writes_what_humantime_writes_where_it_can() {
        let mut time = UNIX_EPOCH;
        // A walk over 1970-9999 in steps of 27 days and some microseconds, which come
        // round to every day of the month and every leap day.
        while time < UNIX_EPOCH + Duration::from_secs(253_402_300_799) {
            let ours = PgTimestamp::from_system_time(time).to_string();
            assert_eq!(ours, humantime::format_rfc3339_micros(time).to_string());
            assert_eq!(parse_rfc3339(&ours), Some(time), "{ours}");
            time += Duration::from_micros(27 * 86_400_000_000 + 7_919);
        }
    }

    #[test]
    fn writes_every_time_postgres_can_store() {
        // Values as PostgreSQL stores them (microseconds since 2000), from SELECT
        // ('…'::timestamptz - '2000-01-01+00') in microseconds.
        let cases = [
            (0, "2000-01-01T00:00:00.000000Z"),
            (-1, "1999-12-31T23:59:59.999999Z"),
            (-946_684_800_000_001, "1969-12-31T23:59:59.999999Z"),
            (-1_257_076_799_750_000, "1960-03-01T12:00:00.250000Z"),
            (-63_113_904_000_000_000, "0000-01-01T00:00:00.000000Z"),
            (-63_113_904_000_000_001, "-0001-12-31T23:59:59.999999Z"),
            // PostgreSQL's first instant, 4714-11-24 00:00 BC.
            (-211_813_488_000_000_000, "-4713-11-24T00:00:00.000000Z"),
            (252_455_615_999_999_999, "9999-12-31T23:59:59.999999Z"),
            (252_455_616_000_000_000, "+10000-01-01T00:00:00.000000Z"),
            // Its last, 294276-12-31 23:59:59.999999.
            (9_223_371_331_199_999_999, "+294276-12-31T23:59:59.999999Z"),
            (i64::MAX, "infinity"),
            (i64::MIN, "-infinity"),
        ];
        for (micros, written) in cases {
            let stamp = PgTimestamp(micros);
            assert_eq!(stamp.to_string(), written, "{micros}");
            assert_eq!(PgTimestamp::from_system_time(stamp.to_system_time()), stamp);
        }
        // Beyond what PostgreSQL stores: the nearest infinity, never a panic.
        assert_eq!(
            PgTimestamp::from_system_time(UNIX_EPOCH + Duration::from_secs(u64::MAX / 2)),
            PgTimestamp::INFINITY
        );
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
