//! What a route does to a request and its response besides choosing where it goes: header
//! operations, URL rewrite, redirect (the route's [`RouteFilters`](crate::state::routes::RouteFilters)), without I/O.
//!
//! Semantics are Istio's (so Envoy's): header operations remove, then set, then add; a
//! destination's operations are applied before its route's, so the route's `set` wins (Envoy's
//! order of a weighted cluster and its route). A `uri` rewrite replaces what the route's `uri`
//! match took: the prefix of a `prefix` match (the rest of the path kept), the whole path of an
//! `exact` or `regex` match, and the leading `/` when the match has no `uri` (Istio's catch-all
//! is prefix `/`); the query string stays. A redirect's `Location` is absolute: the request's
//! scheme and authority unless replaced, the new path with the request's query string unless
//! the new `uri` has its own.
use http::{HeaderMap, HeaderName, HeaderValue, Request, Uri, header, uri::PathAndQuery};

use crate::state::routes::{HeaderOps, HttpMatch, Redirect, Rewrite, StringMatch};

/// Applies `ops` to `headers`: remove, then set, then add (Envoy's order).
pub fn apply_header_ops(ops: &HeaderOps, headers: &mut HeaderMap) {
    for name in &ops.remove {
        headers.remove(name.as_str());
    }
    // Names and values were validated with the configuration: a pair that does not convert
    // cannot occur, and is skipped rather than failing a request.
    for (name, value) in &ops.set {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    for (name, value) in &ops.add {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
}

/// The path and query after rewriting `path` with `uri`, given the match entry that held.
pub fn rewritten_path(
    uri: &str,
    matched: Option<&HttpMatch>,
    path: &str,
    query: Option<&str>,
) -> String {
    let replaced = match matched.and_then(|m| m.uri.as_ref()) {
        // The prefix matched (possibly ignoring case) has the prefix's length in bytes.
        Some(StringMatch::Prefix(prefix)) => {
            format!("{uri}{}", path.get(prefix.len()..).unwrap_or(""))
        }
        // Gateway API's `ReplacePrefixMatch`: element-wise, so `/foo` replaced by `/` turns
        // `/foo/bar` into `/bar`, not `//bar`.
        Some(StringMatch::PathPrefix(prefix)) => {
            let rest = path.get(prefix.trim_end_matches('/').len()..).unwrap_or("");
            format!("{}{rest}", uri.trim_end_matches('/'))
        }
        Some(StringMatch::Exact(_) | StringMatch::Regex(_)) => uri.to_string(),
        None => format!("{uri}{}", path.strip_prefix('/').unwrap_or(path)),
    };
    let replaced = if replaced.starts_with('/') {
        replaced
    } else {
        format!("/{replaced}")
    };
    match query {
        Some(query) => format!("{replaced}?{query}"),
        None => replaced,
    }
}

/// Applies `rewrite` to the request sent on: its path (see [`rewritten_path`]) and authority
/// (the URI's when the request carries one, as HTTP/2's `:authority`, else `host`).
pub fn apply_rewrite<B>(rewrite: &Rewrite, matched: Option<&HttpMatch>, request: &mut Request<B>) {
    let mut parts = request.uri().clone().into_parts();
    if let Some(uri) = &rewrite.uri {
        let path = if rewrite.full_path {
            match request.uri().query() {
                Some(query) => format!("{uri}?{query}"),
                None => uri.clone(),
            }
        } else {
            rewritten_path(uri, matched, request.uri().path(), request.uri().query())
        };
        if let Ok(path) = path.parse::<PathAndQuery>() {
            parts.path_and_query = Some(path);
        }
    }
    if let Some(authority) = &rewrite.authority {
        if parts.authority.is_some() {
            parts.authority = authority.parse().ok().or(parts.authority);
        } else if let Ok(host) = HeaderValue::from_str(authority) {
            request.headers_mut().insert(header::HOST, host);
        }
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}

/// The `Location` of `redirect` for a request to `scheme://authority/path?query`.
pub fn redirect_location(
    redirect: &Redirect,
    scheme: &str,
    authority: &str,
    path: &str,
    query: Option<&str>,
) -> String {
    let scheme = redirect.scheme.as_deref().unwrap_or(scheme);
    let mut authority = redirect
        .authority
        .as_deref()
        .unwrap_or(authority)
        .to_string();
    if let Some(port) = redirect.port {
        authority = format!("{}:{port}", host_of(&authority));
    }
    let target = match &redirect.uri {
        Some(uri) if uri.contains('?') => uri.clone(),
        Some(uri) => match query {
            Some(query) => format!("{uri}?{query}"),
            None => uri.clone(),
        },
        None => match query {
            Some(query) => format!("{path}?{query}"),
            None => path.to_string(),
        },
    };
    format!("{scheme}://{authority}{target}")
}

/// The host of `authority`, without its port (`[v6]` kept bracketed).
fn host_of(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .find(']')
            .map_or(authority, |end| &authority[..=end]);
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::routes::FullRegex;

    fn with_uri(uri: StringMatch) -> HttpMatch {
        HttpMatch {
            uri: Some(uri),
            ..HttpMatch::default()
        }
    }

    #[test]
    fn header_ops_remove_then_set_then_add() {
        let mut headers = HeaderMap::new();
        headers.insert("x-old", HeaderValue::from_static("1"));
        headers.insert("x-set", HeaderValue::from_static("before"));
        headers.append("x-set", HeaderValue::from_static("twice"));
        headers.insert("x-add", HeaderValue::from_static("a"));
        let ops = HeaderOps {
            set: vec![
                ("x-set".into(), "after".into()),
                ("x-new".into(), "n".into()),
            ],
            add: vec![
                ("x-add".into(), "b".into()),
                ("x-old".into(), "again".into()),
            ],
            remove: vec!["x-old".into()],
        };
        apply_header_ops(&ops, &mut headers);
        let all = |name: &str| -> Vec<&str> {
            headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect()
        };
        assert_eq!(all("x-set"), ["after"]);
        assert_eq!(all("x-new"), ["n"]);
        assert_eq!(all("x-add"), ["a", "b"]);
        // Removed first, so an add of the same name survives.
        assert_eq!(all("x-old"), ["again"]);
    }

    #[test]
    fn a_uri_rewrite_replaces_what_the_match_took_and_keeps_the_query() {
        let prefix = with_uri(StringMatch::Prefix("/api/v1".into()));
        assert_eq!(
            rewritten_path("/v2", Some(&prefix), "/api/v1/books/3", Some("a=1")),
            "/v2/books/3?a=1"
        );
        // A prefix matched ignoring case takes as many bytes.
        let mut insensitive = prefix.clone();
        insensitive.ignore_uri_case = true;
        assert_eq!(
            rewritten_path("/v2", Some(&insensitive), "/API/V1/x", None),
            "/v2/x"
        );
        let exact = with_uri(StringMatch::Exact("/login".into()));
        assert_eq!(
            rewritten_path("/auth/login", Some(&exact), "/login", None),
            "/auth/login"
        );
        let regex = with_uri(StringMatch::Regex(FullRegex::new("/r/.*").unwrap()));
        assert_eq!(
            rewritten_path("/s", Some(&regex), "/r/abc", Some("q")),
            "/s?q"
        );
        // No uri condition: Istio's catch-all prefix `/` is replaced.
        assert_eq!(rewritten_path("/v2/", None, "/books", None), "/v2/books");
        assert_eq!(rewritten_path("/", Some(&prefix), "/api/v1", None), "/");
        // The result is always a path.
        assert_eq!(rewritten_path("", Some(&prefix), "/api/v1/x", None), "/x");
    }

    #[test]
    fn gateway_api_path_prefixes_match_and_rewrite_element_wise() {
        let prefix = StringMatch::PathPrefix("/foo".into());
        for (path, expected) in [
            ("/foo", true),
            ("/foo/", true),
            ("/foo/bar", true),
            ("/foobar", false),
            ("/fo", false),
        ] {
            assert_eq!(prefix.matches(path), expected, "{path}");
        }
        // A trailing slash is ignored; `/` matches every path.
        assert!(StringMatch::PathPrefix("/foo/".into()).matches("/foo"));
        assert!(StringMatch::PathPrefix("/".into()).matches("/anything"));

        // ReplacePrefixMatch, with the Gateway API's examples.
        let matched = with_uri(prefix);
        let rewrite = |to: &str, path: &str| rewritten_path(to, Some(&matched), path, None);
        assert_eq!(rewrite("/xyz", "/foo/bar"), "/xyz/bar");
        assert_eq!(rewrite("/xyz/", "/foo/bar"), "/xyz/bar");
        assert_eq!(rewrite("/", "/foo/bar"), "/bar");
        assert_eq!(rewrite("/", "/foo"), "/");
        assert_eq!(rewrite("/xyz", "/foo"), "/xyz");
        assert_eq!(rewrite("/xyz", "/foo/"), "/xyz/");
        let root = with_uri(StringMatch::PathPrefix("/".into()));
        assert_eq!(
            rewritten_path("/v2", Some(&root), "/a/b", Some("q=1")),
            "/v2/a/b?q=1"
        );

        // ReplaceFullPath replaces the whole path, whatever the match, and keeps the query.
        let full = Rewrite {
            uri: Some("/other".into()),
            authority: None,
            full_path: true,
        };
        let mut request = Request::get("/foo/bar?x=1").body(()).unwrap();
        apply_rewrite(&full, Some(&matched), &mut request);
        assert_eq!(request.uri(), "/other?x=1");
    }

    #[test]
    fn rewrite_sets_the_path_and_the_authority_of_either_form() {
        let rewrite = Rewrite {
            uri: Some("/new".into()),
            authority: Some("reviews.example".into()),
            full_path: false,
        };
        let prefix = with_uri(StringMatch::Prefix("/old".into()));
        // HTTP/1: origin form and a host header.
        let mut h1 = Request::get("/old/page?x=1")
            .header("host", "10.96.0.30:9080")
            .body(())
            .unwrap();
        apply_rewrite(&rewrite, Some(&prefix), &mut h1);
        assert_eq!(h1.uri().to_string(), "/new/page?x=1");
        assert_eq!(h1.headers()["host"], "reviews.example");
        // HTTP/2: the authority is in the URI.
        let mut h2 = Request::get("http://10.96.0.30:9080/old").body(()).unwrap();
        apply_rewrite(&rewrite, Some(&prefix), &mut h2);
        assert_eq!(h2.uri().to_string(), "http://reviews.example/new");
        assert!(!h2.headers().contains_key("host"));
    }

    #[test]
    fn redirect_locations_replace_only_what_is_set() {
        let redirect =
            |uri: Option<&str>, authority: Option<&str>, port, scheme: Option<&str>| Redirect {
                uri: uri.map(str::to_string),
                authority: authority.map(str::to_string),
                port,
                scheme: scheme.map(str::to_string),
                code: 301,
            };
        let loc =
            |r: &Redirect, query| redirect_location(r, "http", "10.96.0.30:9080", "/old", query);
        assert_eq!(
            loc(&redirect(Some("/new"), None, None, None), Some("a=1")),
            "http://10.96.0.30:9080/new?a=1"
        );
        assert_eq!(
            loc(&redirect(Some("/new?b=2"), None, None, None), Some("a=1")),
            "http://10.96.0.30:9080/new?b=2"
        );
        assert_eq!(
            loc(
                &redirect(None, Some("shop.example"), None, Some("https")),
                None
            ),
            "https://shop.example/old"
        );
        assert_eq!(
            loc(&redirect(None, None, Some(8443), None), None),
            "http://10.96.0.30:8443/old"
        );
        assert_eq!(
            redirect_location(
                &redirect(None, None, Some(80), None),
                "http",
                "[fd00::1]:9080",
                "/",
                None
            ),
            "http://[fd00::1]:80/"
        );
    }
}
