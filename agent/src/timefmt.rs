//! Time as text, one way for the whole crate: durations read from flags (`--cert-ttl 24h`,
//! `--max-ttl`, `--root-ttl 3650d`) and instants written to logs, status and the admin
//! endpoint (RFC 3339, to the second, UTC). Depends on nothing else of the crate.
use std::time::{Duration, SystemTime};

/// Parses a positive duration of whole seconds in humantime's syntax: numbers with units,
/// concatenated or spaced, such as `90s`, `15m`, `24h`, `7d`, `1h30m`, `1h 30m`, `3650d`, `2w`
/// (units `s`, `m`/`min`, `h`, `d`, `w`, `M` = 30.44 d, `y` = 365.25 d, and their long forms).
pub fn parse_duration(input: &str) -> Result<Duration, String> {
    let err = |why: &dyn std::fmt::Display| {
        format!("invalid duration {input:?}: {why} (write e.g. 90s, 15m, 24h, 7d, 1h30m)")
    };
    let duration = humantime::parse_duration(input.trim()).map_err(|e| err(&e))?;
    if duration.is_zero() {
        return Err(err(&"must be positive"));
    }
    if duration.subsec_nanos() != 0 {
        return Err(err(&"must be whole seconds"));
    }
    Ok(duration)
}

/// `time` as RFC 3339 in UTC, to the second (cut, as Kubernetes stores times), e.g.
/// `2026-01-02T03:04:05Z`. A time outside jiff's range (years -9999 to 9999) is printed in
/// `Debug` form rather than refused: this is for people to read.
pub fn rfc3339(time: SystemTime) -> String {
    match jiff::Timestamp::try_from(time) {
        Ok(t) => jiff::Timestamp::from_second(t.as_second())
            .unwrap_or(t)
            .to_string(),
        Err(_) => format!("{time:?}"),
    }
}

/// Now, as [`rfc3339`] writes it.
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration(" 1h 30m "), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(14 * 86400)));
        assert_eq!(
            parse_duration("3650d"),
            Ok(Duration::from_secs(3650 * 86400))
        );
        for bad in ["", "10", "h", "5x", "0s", "0", "1.5s", "500ms", "-1h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        let err = parse_duration("5x").unwrap_err();
        assert!(err.contains("\"5x\"") && err.contains("24h"), "{err}");
    }

    #[test]
    fn instants_print_as_rfc3339_to_the_second() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_767_323_045, 999_000_000);
        assert_eq!(rfc3339(t), "2026-01-02T03:04:05Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        // Before the epoch (a certificate's notBefore may be): printed, not a panic.
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(86400);
        assert_eq!(rfc3339(before), "1969-12-31T00:00:00Z");
        assert_eq!(now_rfc3339().len(), "2026-01-02T03:04:05Z".len());
    }
}
