//! B3 propagation (openzipkin/b3-propagation), as Envoy's Zipkin tracer speaks it: the single
//! `b3` header and the `x-b3-*` ones, read on the way in and rewritten on the way out. A few
//! lines of header syntax; the only Rust B3 propagator is the deprecated Zipkin exporter's.
use http::{HeaderMap, HeaderValue};
use opentelemetry::trace::{SpanContext, SpanId, TraceId};

/// Which headers a request carried its B3 context in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// `b3: {trace id}-{span id}[-{sampling}[-{parent span id}]]`, or `b3: {sampling}`.
    Single,
    /// `x-b3-traceid`, `x-b3-spanid`, `x-b3-parentspanid`, `x-b3-sampled`, `x-b3-flags`.
    Multi,
}

/// A B3 context: its ids (none for a sampling decision alone) and its sampling decision
/// (none: deferred to the receiver).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incoming {
    pub form: Form,
    pub ids: Option<(TraceId, SpanId)>,
    pub sampled: Option<bool>,
}

/// The B3 context of `headers`, if they carry a valid one (an invalid one is ignored, as
/// the specification says: a new trace starts).
pub fn extract(headers: &HeaderMap) -> Option<Incoming> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(single) = get("b3") {
        return single_header(single);
    }
    let ids = (
        trace_id(get("x-b3-traceid")?)?,
        span_id(get("x-b3-spanid")?)?,
    );
    let sampled = if get("x-b3-flags") == Some("1") {
        Some(true)
    } else {
        match get("x-b3-sampled") {
            None => None,
            Some("1" | "true") => Some(true),
            Some("0" | "false") => Some(false),
            Some(_) => return None,
        }
    };
    Some(Incoming {
        form: Form::Multi,
        ids: Some(ids),
        sampled,
    })
}

fn single_header(value: &str) -> Option<Incoming> {
    // At most four fields; a fifth (the rest of the value) makes it invalid. `splitn` keeps the
    // work and the allocation bounded whatever the caller sends.
    let parts: Vec<&str> = value.splitn(5, '-').collect();
    let decision = |s: &str| match s {
        "1" | "d" => Some(Some(true)),
        "0" => Some(Some(false)),
        _ => None,
    };
    let (ids, sampled) = match parts.as_slice() {
        [sampling] => (None, decision(sampling)?),
        [trace, span] => (Some((trace_id(trace)?, span_id(span)?)), None),
        [trace, span, sampling] | [trace, span, sampling, _] => (
            Some((trace_id(trace)?, span_id(span)?)),
            decision(sampling)?,
        ),
        _ => return None,
    };
    if let [_, _, _, parent] = parts.as_slice() {
        span_id(parent)?;
    }
    Some(Incoming {
        form: Form::Single,
        ids,
        sampled,
    })
}

/// 16 or 32 lower-case hex digits, not all zero (a 64-bit id is the low half).
fn trace_id(hex: &str) -> Option<TraceId> {
    let valid =
        matches!(hex.len(), 16 | 32) && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let id = TraceId::from_hex(hex).ok().filter(|_| valid)?;
    (id != TraceId::INVALID).then_some(id)
}

/// 16 lower-case hex digits, not all zero.
fn span_id(hex: &str) -> Option<SpanId> {
    let valid = hex.len() == 16 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let id = SpanId::from_hex(hex).ok().filter(|_| valid)?;
    (id != SpanId::INVALID).then_some(id)
}

/// Writes `span` (child of `parent`, if given) into `headers` in `form`.
pub fn inject(
    span: &SpanContext,
    parent: Option<&SpanContext>,
    form: Form,
    headers: &mut HeaderMap,
) {
    let sampled = if span.is_sampled() { "1" } else { "0" };
    let parent = parent.map(|p| p.span_id().to_string());
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    match form {
        Form::Single => {
            let mut value = format!("{}-{}-{sampled}", span.trace_id(), span.span_id());
            if let Some(parent) = parent {
                value = format!("{value}-{parent}");
            }
            set("b3", value);
        }
        Form::Multi => {
            set("x-b3-traceid", span.trace_id().to_string());
            set("x-b3-spanid", span.span_id().to_string());
            set("x-b3-sampled", sampled.to_string());
            if let Some(parent) = parent {
                set("x-b3-parentspanid", parent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const CLIENT_SPAN: &str = "00f067aa0ba902b7";

    #[test]
    fn b3_parsing_follows_the_specification() {
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, HeaderValue::from_str(value).unwrap());
            }
            map
        };
        let parsed = extract(&headers(&[(
            "b3",
            &format!("{CLIENT_TRACE}-{CLIENT_SPAN}-d"),
        )]))
        .unwrap();
        assert_eq!(parsed.sampled, Some(true));
        assert_eq!(parsed.form, Form::Single);
        // All four fields.
        let full = extract(&headers(&[(
            "b3",
            &format!("{CLIENT_TRACE}-{CLIENT_SPAN}-0-{CLIENT_SPAN}"),
        )]))
        .unwrap();
        assert_eq!((full.sampled, full.ids.is_some()), (Some(false), true));
        assert_eq!(
            extract(&headers(&[("b3", "1")])),
            Some(Incoming {
                form: Form::Single,
                ids: None,
                sampled: Some(true)
            })
        );
        for bad in [
            "xyz",
            "4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7",
            "4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-1",
            "4bf92f3577b34da6-00f067aa0ba902b7-2",
            "00000000000000000000000000000000-00f067aa0ba902b7",
            "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1-zz",
            // Empty fields, a trailing dash, a fifth field, many dashes, no value.
            "",
            "-",
            "4bf92f3577b34da6a3ce929d0e0e4736--1",
            "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-",
            "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1-",
            "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1-00f067aa0ba902b7-",
            "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1-00f067aa0ba902b7-x",
            "-".repeat(10_000).as_str(),
        ] {
            assert_eq!(extract(&headers(&[("b3", bad)])), None, "{bad}");
        }
        let multi = extract(&headers(&[
            ("x-b3-traceid", CLIENT_TRACE),
            ("x-b3-spanid", CLIENT_SPAN),
            ("x-b3-flags", "1"),
        ]))
        .unwrap();
        assert_eq!((multi.form, multi.sampled), (Form::Multi, Some(true)));
        assert_eq!(extract(&headers(&[("x-b3-traceid", CLIENT_TRACE)])), None);
        assert_eq!(extract(&HeaderMap::new()), None);
    }
}
