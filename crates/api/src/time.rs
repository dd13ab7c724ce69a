//! Timestamps: milliseconds since the Unix epoch inside; on the wire, seconds since the epoch as a
//! number (`1764676800.123`), the original design's type, which TD scripts compute with
//! (`time.time() - status["created_at"]`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::ToSchema;

/// A point in time with millisecond precision, serialized as seconds since the Unix epoch
/// (`1764676800.123`). Deserializing also takes the RFC 3339 text earlier versions wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ToSchema)]
#[schema(value_type = f64, example = 1764676800.123)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The current time.
    pub fn now() -> Timestamp {
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Timestamp(i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
    }

    /// Milliseconds since the epoch.
    pub fn millis(self) -> i64 {
        self.0
    }

    /// Parses the RFC 3339 form this type writes (`YYYY-MM-DDTHH:MM:SS(.fff)Z`).
    pub fn parse_rfc3339(s: &str) -> Option<Timestamp> {
        let b = s.as_bytes();
        if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || !s.ends_with('Z') {
            return None;
        }
        let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
        let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
        let frac = &s[19..s.len() - 1];
        let ms = if frac.is_empty() {
            0
        } else {
            let digits = frac.strip_prefix('.')?;
            let mut padded = digits.chars().take(3).collect::<String>();
            while padded.len() < 3 {
                padded.push('0');
            }
            padded.parse::<i64>().ok()?
        };
        let days = days_from_civil(y, mo, d);
        Some(Timestamp(((days * 24 + h) * 60 + mi) * 60_000 + sec * 1000 + ms))
    }
}

/// Formats milliseconds since the epoch as RFC 3339 UTC with milliseconds.
pub fn format_rfc3339_ms(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (h, mi, s, milli) = (rem / 3_600_000, rem / 60_000 % 60, rem / 1000 % 60, rem % 1000);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
}

// Howard Hinnant's civil calendar algorithms (public domain descriptions), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format_rfc3339_ms(self.0))
    }
}

impl Timestamp {
    /// Seconds since the epoch, as sent on the wire.
    pub fn epoch_seconds(self) -> f64 {
        self.0 as f64 / 1000.0
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.epoch_seconds())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Seconds(f64),
            Text(String),
        }
        match Wire::deserialize(deserializer)? {
            Wire::Seconds(s) if s.is_finite() => Ok(Timestamp((s * 1000.0).round() as i64)),
            Wire::Seconds(s) => Err(serde::de::Error::custom(format!("not a time: {s}"))),
            Wire::Text(s) => Timestamp::parse_rfc3339(&s)
                .ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 UTC time: {s}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_rfc3339_ms(1_795_691_835_463), "2026-11-26T11:17:15.463Z");
        assert_eq!(format_rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn parse_inverts_format() {
        for ms in [0, 1, 951_782_400_000, 1_795_691_835_463, 4_102_444_799_999] {
            let text = format_rfc3339_ms(ms);
            assert_eq!(Timestamp::parse_rfc3339(&text), Some(Timestamp(ms)), "{text}");
        }
        assert_eq!(Timestamp::parse_rfc3339("2026-11-26 12:00:00Z"), None);
    }

    #[test]
    fn wire_form_is_epoch_seconds_and_reads_back() {
        let t = Timestamp(1_795_691_835_463);
        assert_eq!(serde_json::to_string(&t).unwrap(), "1795691835.463");
        assert_eq!(serde_json::from_str::<Timestamp>("1795691835.463").unwrap(), t);
        assert_eq!(serde_json::from_str::<Timestamp>("\"2026-11-26T11:17:15.463Z\"").unwrap(), t);
    }
}
