//! The JSON log format (`--log-format json`), with access-log lines written straight into the
//! line buffer.
//!
//! Why: tracing-subscriber's JSON formatter runs every field through serde_json writing into an
//! `io::Write` adapter over the line's `String`, which checks each piece for UTF-8 and goes
//! through several layers of dynamic dispatch per piece. For the waypoint's access line, one
//! per request with some twenty fields, that was the largest single cost left in a request
//! (docs/perf/README.md, "Access-log lines formatted in place"). [`JsonLines`] writes the same
//! line (same keys, same order, same escaping: serde_json's) with `fmt::Write` calls on the
//! buffer.
//!
//! Only access-log lines ([`ACCESS_TARGET`]) outside any span take this path; every other
//! line, and an access line logged inside a span (whose `span` and `spans` keys tracing
//! writes), is formatted by tracing-subscriber's own formatter, so the format is one. Records
//! of the `log` crate (aya-log's) have the target `log` until tracing-subscriber normalizes
//! them, so they all take its path. A unit test formats the same events with both and
//! compares the lines.
use std::fmt::{self, Write as _};

use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    fmt::{
        FmtContext, FormatEvent, FormatFields,
        format::{self, Format, Json, Writer},
        time::{FormatTime, SystemTime},
    },
    registry::LookupSpan,
};

use super::ACCESS_TARGET;

/// tracing-subscriber's JSON format with flattened fields (each field a key of the line),
/// access-log lines formatted in place.
pub(crate) struct JsonLines {
    /// tracing-subscriber's formatter, for every line but the access log's.
    others: Format<Json, SystemTime>,
}

impl Default for JsonLines {
    fn default() -> Self {
        Self {
            others: format::format().json().flatten_event(true),
        }
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        // In a span as tracing decides which span a line shows (its parent, else the current
        // one); asked of access lines only, the others go to tracing's formatter anyway.
        if meta.target() != ACCESS_TARGET
            || event.parent().is_some()
            || ctx.lookup_current().is_some()
        {
            return self.others.format_event(ctx, writer, event);
        }
        // The keys and their order are tracing-subscriber's (`format::json`): the timestamp, the
        // level, the event's fields in order, the target.
        writer.write_str("{\"timestamp\":\"")?;
        // tracing's timestamps (RFC 3339) have nothing to escape.
        SystemTime.format_time(&mut writer)?;
        writer.write_str("\",\"level\":\"")?;
        writer.write_str(meta.level().as_str())?;
        writer.write_char('"')?;
        let mut fields = FieldWriter {
            writer: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str(",\"target\":")?;
        write_string(&mut writer, meta.target())?;
        writer.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`, as serde_json writes a map's entries.
struct FieldWriter<'a, 'w> {
    writer: &'a mut Writer<'w>,
    /// The first error; what follows it is skipped.
    result: fmt::Result,
}

impl FieldWriter<'_, '_> {
    /// Writes the field's key, then its value with `value`, unless an earlier write failed.
    fn entry(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            self.writer.write_char(',')?;
            write_string(self.writer, field.name())?;
            self.writer.write_char(':')?;
            value(self.writer)
        })();
    }
}

/// Each kind of value as tracing-serde's map visitor serializes it with serde_json: numbers and
/// booleans as themselves, strings and anything formatted (`%`, `?`, messages, errors, and the
/// 128-bit integers, which tracing formats) as JSON strings.
impl Visit for FieldWriter<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, |w| write_string(w, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, |w| {
            w.write_char('"')?;
            write!(Escaping(w), "{value:?}")?;
            w.write_char('"')
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // serde_json's own float text (and `null` for what JSON cannot hold): rare in a line.
        self.entry(field, |w| {
            let text = serde_json::to_string(&value).map_err(|_| fmt::Error)?;
            w.write_str(&text)
        });
    }
}

/// `value` as a JSON string.
fn write_string(w: &mut impl fmt::Write, value: &str) -> fmt::Result {
    w.write_char('"')?;
    Escaping(w).write_str(value)?;
    w.write_char('"')
}

/// Escapes what it is given as the inside of a JSON string, exactly as serde_json does:
/// `"` and `\`, the control characters below U+0020 (`\b`, `\t`, `\n`, `\f`, `\r` by name,
/// the others as `\u00xx`); everything else, U+007F and non-ASCII included, as it is.
struct Escaping<'a, W: ?Sized>(&'a mut W);

impl<W: fmt::Write + ?Sized> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut start = 0;
        for (i, byte) in s.bytes().enumerate() {
            let named = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                0x08 => "\\b",
                b'\t' => "\\t",
                b'\n' => "\\n",
                0x0c => "\\f",
                b'\r' => "\\r",
                0..0x20 => "",
                _ => continue,
            };
            // Every escaped byte is ASCII: the runs between them are whole characters.
            self.0.write_str(&s[start..i])?;
            if named.is_empty() {
                write!(self.0, "\\u{byte:04x}")?;
            } else {
                self.0.write_str(named)?;
            }
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use tracing_subscriber::prelude::*;

    use super::*;
    use crate::testing::log_lines::Lines;

    /// The lines written, each with its timestamp's value blanked (two runs never share it).
    fn without_timestamps(lines: &Lines) -> Vec<String> {
        lines
            .text()
            .lines()
            .map(|line| {
                let value: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|err| panic!("not JSON ({err}): {line}"));
                assert!(value["timestamp"].is_string(), "no timestamp: {line}");
                let start = line.find("\"timestamp\":\"").unwrap() + 13;
                let end = start + line[start..].find('"').unwrap();
                format!("{}{}", &line[..start], &line[end..])
            })
            .collect()
    }

    /// Every kind of field and every character JSON escapes, in access lines and others.
    fn log_everything() {
        let every_ascii: String = (0u8..0x80).map(char::from).collect();
        let addr: std::net::SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let io_error = io::Error::other("refused: \"no\"\n");
        let error: &dyn std::error::Error = &io_error;
        tracing::info!(
            target: ACCESS_TARGET,
            reporter = "waypoint",
            src = %addr,
            path = every_ascii.as_str(),
            unicode = "é ü 名前 \u{2028} 🦀",
            protocol = ?http::Version::HTTP_11,
            absent = None::<&str>,
            present = Some("yes"),
            bytes = 12345u64,
            negative = -7i64,
            ok = true,
            ratio = 0.25f64,
            nan = f64::NAN,
            big = 1u128 << 100,
            error,
            "request {}", "complete"
        );
        tracing::warn!(target: ACCESS_TARGET, "access line without fields");
        tracing::info!(detail = "a line of another target", n = 3, "something else");
        let span = tracing::info_span!("tunnel", id = 7);
        span.in_scope(|| {
            tracing::info!(target: ACCESS_TARGET, bytes = 1u64, "access line in a span");
        });
        tracing::info!(target: ACCESS_TARGET, parent: &span, bytes = 2u64, "explicit parent");
    }

    /// The lines `format` writes for [`log_everything`].
    fn lines_of<E>(format: E) -> Lines
    where
        E: FormatEvent<tracing_subscriber::Registry, format::JsonFields> + Send + Sync + 'static,
    {
        let lines = Lines::default();
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .event_format(format)
            .with_writer(lines.clone());
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, log_everything);
        lines
    }

    #[test]
    fn lines_are_tracings_own_json_lines() {
        let ours = without_timestamps(&lines_of(JsonLines::default()));
        let tracings = without_timestamps(&lines_of(format::format().json().flatten_event(true)));
        assert_eq!(ours.len(), 5, "{ours:#?}");
        for (ours, tracings) in ours.iter().zip(&tracings) {
            assert_eq!(ours, tracings);
        }
        assert_eq!(ours.len(), tracings.len());
        // The lines in a span kept tracing's span keys.
        assert!(ours[3].contains("\"span\":{"), "{}", ours[3]);
    }

    #[test]
    fn escaping_is_serde_jsons() {
        for c in (0u32..0x800).filter_map(char::from_u32) {
            let text = format!("a{c}b{c}");
            let mut ours = String::new();
            write_string(&mut ours, &text).unwrap();
            assert_eq!(
                ours,
                serde_json::to_string(&text).unwrap(),
                "U+{:04X}",
                c as u32
            );
        }
    }
}
