//! Request target → provider and upstream URI.
//!
//! `{route_prefix}/{rest}` goes to `{base_url}/{rest}` of that provider and
//! bare `/v1/{rest}` to `{base_url}/v1/{rest}` of the default provider, with
//! the query kept. Targets that could make the upstream resolve a different
//! path than the one routed (`..` segments, encoded or not; encoded slashes
//! or backslashes) are refused, as are absolute-form targets naming another
//! host (a request meant for a forward proxy).

use super::error::ProxyError;
use crate::config::{ProviderConfig, ProviderKind};
use http::uri::{Authority, Scheme};
use http::{Uri, Version};
use std::net::{IpAddr, SocketAddr};

/// A provider's routing data, prepared once at start-up.
pub struct RouteTable {
    /// (route prefix, index into the providers list), longest prefix first.
    prefixes: Vec<(String, usize)>,
    default: Option<usize>,
    targets: Vec<Target>,
}

/// Where one provider's requests go.
struct Target {
    scheme: Scheme,
    authority: Authority,
    /// Path of `base_url` without a trailing slash (usually empty).
    base_path: String,
    /// Gemini clients may put their own credentials in the query (`?key=`,
    /// `?access_token=`); they are removed.
    strip_query_credentials: bool,
}

/// The routing decision for one request.
#[derive(Debug, PartialEq, Eq)]
pub struct Routed {
    /// Index into the configured providers.
    pub provider: usize,
    pub upstream: Uri,
    /// Length of the provider's base path at the start of `upstream`'s path.
    base_len: usize,
}

impl Routed {
    /// The upstream path below the provider's base URL: what the client
    /// addressed after the route prefix.
    pub fn rest(&self) -> &str {
        &self.upstream.path()[self.base_len..]
    }
}

impl RouteTable {
    pub fn new(providers: &[ProviderConfig]) -> Self {
        let mut prefixes: Vec<(String, usize)> = providers
            .iter()
            .enumerate()
            .map(|(i, p)| (p.route_prefix.clone(), i))
            .collect();
        prefixes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        RouteTable {
            prefixes,
            default: providers.iter().position(|p| p.default),
            targets: providers
                .iter()
                .map(|p| Target {
                    scheme: p.base_url.scheme().cloned().unwrap_or(Scheme::HTTPS),
                    authority: p
                        .base_url
                        .authority()
                        .cloned()
                        .expect("validated base_url has an authority"),
                    base_path: p.base_url.path().trim_end_matches('/').to_owned(),
                    strip_query_credentials: p.kind == ProviderKind::Gemini,
                })
                .collect(),
        }
    }

    /// Routes a request target.
    pub fn route(
        &self,
        uri: &Uri,
        version: Version,
        local: SocketAddr,
    ) -> Result<Routed, ProxyError> {
        check_absolute_form(uri, version, local)?;
        let path = uri.path();
        check_path(path)?;
        let (provider, rest) = self
            .prefixes
            .iter()
            .find_map(|(prefix, i)| {
                let rest = path.strip_prefix(prefix.as_str())?;
                (rest.is_empty() || rest.starts_with('/')).then_some((*i, rest))
            })
            .or_else(|| {
                let d = self.default?;
                (path == "/v1" || path.starts_with("/v1/")).then_some((d, path))
            })
            .ok_or(ProxyError::UnknownRoute)?;
        let target = &self.targets[provider];
        let mut path_and_query = String::with_capacity(target.base_path.len() + rest.len() + 64);
        path_and_query.push_str(&target.base_path);
        path_and_query.push_str(if rest.is_empty() { "/" } else { rest });
        if let Some(query) = uri.query() {
            append_query(&mut path_and_query, query, target.strip_query_credentials);
        }
        let upstream = Uri::builder()
            .scheme(target.scheme.clone())
            .authority(target.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|_| ProxyError::BadTarget)?;
        Ok(Routed {
            provider,
            upstream,
            base_len: target.base_path.len(),
        })
    }
}

/// Appends `query` without its empty parts and, for Gemini
/// (`strip_credentials`), without the client's own credentials: the API key
/// (`key`) and an OAuth token (`access_token`), their names compared
/// percent-decoded and in any case, so no spelling of them gets through.
fn append_query(out: &mut String, query: &str, strip_credentials: bool) {
    let credential = |name: &str| {
        let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
        ["key", "access_token"]
            .iter()
            .any(|c| name.eq_ignore_ascii_case(c))
    };
    let mut first = true;
    for pair in query.split('&') {
        let name = pair.split('=').next().unwrap_or("");
        if pair.is_empty() || (strip_credentials && credential(name)) {
            continue;
        }
        out.push(if first { '?' } else { '&' });
        out.push_str(pair);
        first = false;
    }
}

/// An HTTP/1 target in absolute-form (`GET http://host:port/...`) or
/// authority-form (`CONNECT host:port`) is what a client sends to a forward
/// proxy, unless it names the address the client connected to (`local`),
/// which RFC 9112 requires a server to accept. The `Host` header is no
/// evidence either way: a proxy's client sets it to the target too. HTTP/2
/// always carries scheme and authority, which name this gateway.
fn check_absolute_form(uri: &Uri, version: Version, local: SocketAddr) -> Result<(), ProxyError> {
    if version >= Version::HTTP_2 {
        return Ok(());
    }
    let Some(authority) = uri.authority() else {
        return Ok(());
    };
    let default_port = if uri.scheme() == Some(&Scheme::HTTPS) {
        443
    } else {
        80
    };
    let host = authority.host();
    let ip = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .parse::<IpAddr>();
    let ours = ip.is_ok_and(|ip| ip.to_canonical() == local.ip().to_canonical())
        && authority.port_u16().unwrap_or(default_port) == local.port();
    if ours {
        Ok(())
    } else {
        Err(ProxyError::BadTarget)
    }
}

/// Refuses dot segments (also percent-encoded, in any case mix), encoded
/// slashes and backslashes, and any of these encoded twice. Runs on every
/// request: no allocation.
fn check_path(path: &str) -> Result<(), ProxyError> {
    let path = path.as_bytes();
    if path.first() != Some(&b'/') || path.contains(&b'\\') {
        return Err(ProxyError::BadTarget);
    }
    for segment in path.split(|&b| b == b'/') {
        if is_dot_segment(segment) || has_encoded_separator(segment) {
            return Err(ProxyError::BadTarget);
        }
    }
    Ok(())
}

/// `.` or `..`, each dot written as `.` or `%2e` (any case).
fn is_dot_segment(mut segment: &[u8]) -> bool {
    let mut dots = 0;
    while !segment.is_empty() {
        if segment[0] == b'.' {
            segment = &segment[1..];
        } else if segment.len() >= 3 && segment[..3].eq_ignore_ascii_case(b"%2e") {
            segment = &segment[3..];
        } else {
            return false;
        }
        dots += 1;
    }
    (1..=2).contains(&dots)
}

/// `%2f` or `%5c` (any case): a slash or backslash the upstream could
/// decode; or a dot, slash or backslash encoded twice (`%252e`), which an
/// upstream (or a proxy in front of it) that decodes twice would turn into
/// a dot segment or a separator.
fn has_encoded_separator(segment: &[u8]) -> bool {
    let once = |w: &[u8]| w.eq_ignore_ascii_case(b"%2f") || w.eq_ignore_ascii_case(b"%5c");
    let twice = |w: &[u8]| {
        w[..3].eq_ignore_ascii_case(b"%25")
            && [&b"2e"[..], b"2f", b"5c"]
                .iter()
                .any(|c| w[3..].eq_ignore_ascii_case(c))
    };
    segment.windows(3).any(once) || segment.windows(5).any(twice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Policy;

    fn provider(
        id: &str,
        kind: ProviderKind,
        base: &str,
        prefix: &str,
        default: bool,
    ) -> ProviderConfig {
        ProviderConfig {
            id: id.into(),
            kind,
            base_url: base.parse().unwrap(),
            route_prefix: prefix.into(),
            default,
            upstream_ca_path: None,
            policy: Policy::LeastLoaded,
            retry_budget: 2,
            probe_interval: None,
        }
    }

    fn table() -> RouteTable {
        RouteTable::new(&[
            provider(
                "openai",
                ProviderKind::OpenAi,
                "https://api.openai.com",
                "/openai",
                true,
            ),
            provider(
                "anthropic",
                ProviderKind::Anthropic,
                "http://127.0.0.1:9000",
                "/anthropic",
                false,
            ),
            provider(
                "gem",
                ProviderKind::Gemini,
                "https://g.example/base",
                "/gemini",
                false,
            ),
        ])
    }

    /// The address the test clients connect to.
    const LOCAL: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);

    fn route(target: &str) -> Result<Routed, ProxyError> {
        table().route(&target.parse().unwrap(), Version::HTTP_11, LOCAL)
    }

    #[test]
    fn prefixes_and_default() {
        let r = route("/openai/v1/chat/completions?x=1").unwrap();
        assert_eq!(r.provider, 0);
        assert_eq!(r.upstream, "https://api.openai.com/v1/chat/completions?x=1");
        let r = route("/anthropic/v1/messages").unwrap();
        assert_eq!(
            (r.provider, r.upstream.to_string().as_str()),
            (1, "http://127.0.0.1:9000/v1/messages")
        );
        let r = route("/v1/embeddings").unwrap();
        assert_eq!(
            (r.provider, r.upstream.to_string().as_str()),
            (0, "https://api.openai.com/v1/embeddings")
        );
        let r = route("/gemini/v1beta/models/x:generateContent?key=CLIENTKEY&alt=sse").unwrap();
        assert_eq!(
            r.upstream,
            "https://g.example/base/v1beta/models/x:generateContent?alt=sse"
        );
        // Below the base path: what the client addressed after the prefix.
        assert_eq!(r.rest(), "/v1beta/models/x:generateContent");
        // Every spelling of the client's credentials goes.
        let r = route(
            "/gemini/v1beta/models/x:generateContent?%6Bey=A&KEY=B&access_token=C&Access%5FToken=D&alt=sse&keys=E",
        )
        .unwrap();
        assert_eq!(
            r.upstream,
            "https://g.example/base/v1beta/models/x:generateContent?alt=sse&keys=E"
        );
        assert_eq!(route("/openai").unwrap().rest(), "/");
        assert_eq!(route("/v1/models").unwrap().rest(), "/v1/models");
    }

    #[test]
    fn unknown_prefix_is_not_found() {
        assert_eq!(route("/openaix/v1/models"), Err(ProxyError::UnknownRoute));
        assert_eq!(route("/v2/models"), Err(ProxyError::UnknownRoute));
        assert_eq!(route("/"), Err(ProxyError::UnknownRoute));
    }

    #[test]
    fn traversal_is_refused() {
        for t in [
            "/openai/../admin",
            "/openai/v1/%2e%2e/x",
            "/openai/v1/%2E./x",
            "/openai/v1/.%2e",
            "/openai/v1/./models",
            "/openai/v1%2fmodels",
            "/openai/v1%5Cmodels",
            "/openai/v1/%252e%252e/x",
            "/openai/v1/%252E./x",
            "/openai/v1%252fmodels",
            "/openai/v1%255Cmodels",
        ] {
            assert_eq!(route(t), Err(ProxyError::BadTarget), "{t}");
        }
        // Dots inside names are not dot segments.
        for t in [
            "/openai/v1/files/report.v2.jsonl",
            "/openai/v1/models/..x",
            "/openai/v1/models/...",
            "/openai/v1/models/%2e%2e%2e",
            "/openai/v1/a%2ex",
            "/openai/v1/files/100%25",
            "/openai/v1/files/%2520x",
        ] {
            assert!(route(t).is_ok(), "{t}");
        }
    }

    #[test]
    fn absolute_form_only_for_the_address_connected_to() {
        for own in [
            "http://127.0.0.1:8080/openai/v1/models",
            "http://[::ffff:127.0.0.1]:8080/openai/v1/models",
        ] {
            assert!(route(own).is_ok(), "{own}");
        }
        for foreign in [
            "http://evil.example/openai/v1/models",
            "http://evil.example:8080/openai/v1/models",
            // The right host on another port, or by a name.
            "http://127.0.0.1/openai/v1/models",
            "https://127.0.0.1:443/openai/v1/models",
            "http://localhost:8080/openai/v1/models",
            "http://127.0.0.2:8080/openai/v1/models",
        ] {
            assert_eq!(route(foreign), Err(ProxyError::BadTarget), "{foreign}");
        }
        // Authority-form, as in `CONNECT api.openai.com:443`.
        let connect = Uri::from_static("api.openai.com:443");
        assert_eq!(
            table().route(&connect, Version::HTTP_11, LOCAL),
            Err(ProxyError::BadTarget)
        );
        // HTTP/2 always names scheme and authority.
        let uri: Uri = "https://evil.example/openai/v1/models".parse().unwrap();
        assert!(table().route(&uri, Version::HTTP_2, LOCAL).is_ok());
    }
}
