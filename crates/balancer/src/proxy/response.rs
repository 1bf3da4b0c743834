//! Response rewriting: what the client gets for a backend's response head,
//! and the route cookie the `cookie` policy sets. No I/O.

use std::io::Write as _;

use httparse::Header;

use super::request::{connection_tokens, header, is_hop_by_hop, usable, Plan};
use crate::config::Config;
use crate::h1::{self, is, FrameError, Framing};
use crate::select::Route;
use crate::Generation;

/// What the balancer decided about a backend's response head.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) framing: Framing,
    /// Remove the chunked framing for an HTTP/1.0 client.
    pub(crate) dechunk: bool,
    /// The backend connection may serve another request afterwards.
    pub(crate) reusable: bool,
    pub(crate) close_client: bool,
    /// A `101` to a forwarded upgrade: both connections become a tunnel.
    pub(crate) tunnel: bool,
    /// `X-Tether-Node`, when a live view is watching.
    pub(crate) node: Option<String>,
}

/// Whether a backend's response field reaches the client (framing fields
/// and `Set-Cookie`'s `Cache-Control` are handled apart): not hop-by-hop,
/// not nominated by the backend's `Connection`.
pub(crate) fn passes(name: &str, tokens: &[&str]) -> bool {
    !is_hop_by_hop(name) && !tokens.iter().any(|t| is(name, t))
}

/// What any client protocol decides alike about a backend's response head.
pub(crate) struct Shape<'a> {
    pub(crate) status: u16,
    pub(crate) framing: Framing,
    /// The backend's `Connection` tokens.
    pub(crate) tokens: Vec<&'a str>,
    /// The backend connection may serve another request afterwards.
    pub(crate) reusable: bool,
}

/// Reads a backend's response head: its framing and whether the backend
/// connection can be reused.
pub(crate) fn shape<'a>(
    res: &httparse::Response<'_, 'a>,
    plan: &Plan,
) -> Result<Shape<'a>, FrameError> {
    let status = res.code.unwrap_or(0);
    let fields: &[Header<'a>] = res.headers;
    let http11 = res.version == Some(1);
    if status == 101 && !plan.upgrade {
        // A switch nobody asked for: nothing after it can be read as HTTP.
        return Err(FrameError::Coding);
    }
    let framing = h1::response_framing(fields, status, plan.head, !http11)?;
    let tokens = connection_tokens(fields);
    // A length beside a coding is a message someone may read differently:
    // pass it on re-framed, but do not reuse the connection.
    let ambiguous = fields.iter().any(|h| is(h.name, "content-length"))
        && fields.iter().any(|h| is(h.name, "transfer-encoding"));
    let backend_close = tokens.iter().any(|t| t.eq_ignore_ascii_case("close"))
        || (!http11 && !tokens.iter().any(|t| t.eq_ignore_ascii_case("keep-alive")));
    Ok(Shape {
        status,
        framing,
        reusable: status != 101 && !backend_close && !ambiguous && framing != Framing::Close,
        tokens,
    })
}

/// Writes the head to send the client for a backend's response.
pub(crate) fn plan_response(
    out: &mut Vec<u8>,
    res: &httparse::Response<'_, '_>,
    plan: &Plan,
    set_cookie: Option<&str>,
    stopping: bool,
) -> Result<Answer, FrameError> {
    let Shape {
        status,
        framing,
        tokens,
        reusable,
    } = shape(res, plan)?;
    let fields: &[Header<'_>] = res.headers;
    let tunnel = status == 101;
    let dechunk = framing == Framing::Chunked && plan.http10;
    let close_client = !plan.keep_alive || stopping || framing == Framing::Close || dechunk;
    let mut node = None;
    let mut cache_control: Vec<&[u8]> = Vec::new();
    let mut length: Option<&[u8]> = None;
    out.clear();
    out.reserve(1024);
    let _ = write!(out, "HTTP/1.1 {status} ");
    out.extend_from_slice(res.reason.unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in fields {
        let name = h.name;
        // The framing fields are written by the balancer below.
        if is(name, "content-length") {
            length.get_or_insert(h.value.trim_ascii());
            continue;
        }
        if tunnel && is(name, "upgrade") {
            header(out, name, h.value);
            continue;
        }
        if !passes(name, &tokens) {
            continue;
        }
        if set_cookie.is_some() && is(name, "cache-control") {
            cache_control.push(h.value);
            continue;
        }
        if plan.described.is_some() && is(name, "x-tether-node") {
            node = std::str::from_utf8(h.value).ok().map(str::to_string);
        }
        header(out, name, h.value);
    }
    match framing {
        _ if tunnel => {}
        Framing::Length(n) => {
            let _ = write!(out, "Content-Length: {n}\r\n");
        }
        Framing::Chunked if !dechunk => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        // HEAD, 204, 304 and an empty body keep the length they announce.
        Framing::Empty => {
            if let Some(v) = length {
                header(out, "Content-Length", v);
            }
        }
        Framing::Chunked | Framing::Close => {}
    }
    if let Some(cookie) = set_cookie {
        header(out, "Set-Cookie", cookie.as_bytes());
        let existing = (!cache_control.is_empty()).then(|| cache_control.join(&b", "[..]));
        header(out, "Cache-Control", &no_shared_cache(existing.as_deref()));
    }
    if tunnel {
        out.extend_from_slice(b"Connection: Upgrade\r\n");
    } else if close_client {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if plan.http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Answer {
        status,
        framing,
        dechunk,
        reusable,
        close_client: close_client || tunnel,
        tunnel,
        node,
    })
}

/// The `Cache-Control` of a response that sets the route cookie: a shared
/// cache must not store it, or it would pin whoever receives it to one backend.
pub(crate) fn no_shared_cache(existing: Option<&[u8]>) -> Vec<u8> {
    match existing {
        Some(v) => {
            let lower = v.to_ascii_lowercase();
            let has = |s: &[u8]| lower.windows(s.len()).any(|w| w == s);
            let mut v = v.to_vec();
            if !(has(b"no-cache=\"set-cookie\"") || has(b"private") || has(b"no-store")) {
                v.extend_from_slice(b", no-cache=\"set-cookie\"");
            }
            v
        }
        None => b"private, no-cache=\"set-cookie\"".to_vec(),
    }
}

/// The route cookie to set when the request is served by backend `i`: none
/// when the client's valid cookie already names `i` (and a live backup).
/// Behind TLS it is `Secure` whatever the configuration says.
pub(crate) fn route_cookie(g: &Generation, plan: &Plan, i: usize) -> Option<String> {
    let codec = g.codec.as_ref()?;
    let member = &g.pool.members[i];
    let stale = match &plan.choice.route {
        Some(r) => {
            r.primary != *member.id
                || r.backup
                    .as_deref()
                    .is_some_and(|b| g.pool.index_of(b).is_none())
        }
        None => true,
    };
    if !stale {
        return None;
    }
    let now_ms = g.pool.now_ms();
    let eject = Config::ms(g.config.health.eject_ms);
    let backup = plan
        .candidates
        .iter()
        .chain(&plan.choice.order)
        .copied()
        .find(|b| *b != i && usable(g, *b, now_ms, eject, plan.choice.bound))
        .map(|b| g.pool.members[b].id.to_string());
    Some(codec.set_cookie(
        &Route {
            primary: member.id.to_string(),
            backup,
        },
        plan.tls,
    ))
}
