use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum_core::body::Body;
use axum_core::response::Response;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use tether_core::SessionId;
use tower_service::Service;

use crate::config::SessionConfig;
use crate::error::{error_response, store_message, store_status};
use crate::session::{principals_of, Backend, Outcome, Session};
use crate::users::Principals;

/// The service built by [`crate::SessionLayer`].
#[derive(Clone)]
pub struct SessionService<S> {
    inner: S,
    backend: Backend,
    config: Arc<SessionConfig>,
    principals: Option<Principals>,
}

impl<S> std::fmt::Debug for SessionService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionService")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S> SessionService<S> {
    pub(crate) fn new(inner: S, backend: Backend, config: Arc<SessionConfig>) -> Self {
        let principals = principals_of(&backend, config.listener.clone());
        Self {
            inner,
            backend,
            config,
            principals,
        }
    }
}

/// How the client sent its ID, so the answer goes back the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Cookie,
    Header,
    Nothing,
}

/// The first value of cookie `name` that parses as a session ID.
///
/// A malformed value is "no session": it never reaches the store. So is a
/// marked ID ([`SessionId::derived`]): those name the store's own records
/// (a user's session index, deny-lists), which a client must never address.
/// The header is read as bytes: another cookie holding a non-UTF-8 byte does
/// not hide the session cookie.
pub(crate) fn id_from_cookies(headers: &HeaderMap, name: &str) -> Option<SessionId> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .filter_map(|pair| {
            let eq = pair.iter().position(|b| *b == b'=')?;
            Some((pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii()))
        })
        .filter(|(k, _)| *k == name.as_bytes())
        .filter_map(|(_, v)| std::str::from_utf8(v).ok())
        .filter_map(|v| SessionId::parse(v.trim_matches('"')).ok())
        .find(|id| !id.is_derived())
}

/// The headers that say what a request's client is, kept as they came (a
/// reference count each): only a login reads them, to record its device.
#[derive(Debug, Clone, Default)]
pub(crate) struct Device {
    user_agent: Option<HeaderValue>,
    forwarded_for: Option<HeaderValue>,
    real_ip: Option<HeaderValue>,
}

impl Device {
    fn of(headers: &HeaderMap) -> Self {
        Self {
            user_agent: headers.get(header::USER_AGENT).cloned(),
            forwarded_for: headers.get("x-forwarded-for").cloned(),
            real_ip: headers.get("x-real-ip").cloned(),
        }
    }

    /// What the request says of its client, for a user's session list:
    /// the user agent and the address a proxy in front recorded (the first
    /// `X-Forwarded-For` hop, else `X-Real-IP`). Both are the client's word
    /// (or its proxy's): shown to the user, never trusted. Bounded in length.
    pub(crate) fn describe(&self) -> std::collections::BTreeMap<String, String> {
        let text = |v: &Option<HeaderValue>| {
            v.as_ref()
                .and_then(|v| v.to_str().ok())
                .map(|v| v.chars().take(256).collect::<String>())
        };
        let mut d = std::collections::BTreeMap::new();
        if let Some(ua) = text(&self.user_agent) {
            d.insert("user_agent".into(), ua);
        }
        let address = text(&self.forwarded_for)
            .and_then(|v| v.split(',').next().map(|a| a.trim().to_string()))
            .or_else(|| text(&self.real_ip));
        if let Some(a) = address.filter(|a| !a.is_empty()) {
            d.insert("address".into(), a);
        }
        d
    }
}

fn incoming(headers: &HeaderMap, config: &SessionConfig) -> (Option<SessionId>, Via) {
    if let Some(id) = id_from_cookies(headers, &config.cookie_name) {
        return (Some(id), Via::Cookie);
    }
    if let Some(name) = &config.header {
        if let Some(id) = headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| SessionId::parse(v.trim()).ok())
            .filter(|id| !id.is_derived())
        {
            return (Some(id), Via::Header);
        }
    }
    (None, Via::Nothing)
}

/// The client's token (stateless mode): the session cookie's value, or a
/// bearer token, or the configured header.
fn incoming_token(headers: &HeaderMap, config: &SessionConfig) -> (Option<String>, Via) {
    let from_cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, v)| *k == config.cookie_name && !v.is_empty())
        .map(|(_, v)| v.trim().to_string());
    if let Some(t) = from_cookie {
        return (Some(t), Via::Cookie);
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let from_header = bearer.or_else(|| {
        let name = config.header.as_ref()?;
        headers
            .get(name)?
            .to_str()
            .ok()
            .map(|t| t.trim().to_string())
    });
    match from_header {
        Some(t) if !t.is_empty() => (Some(t), Via::Header),
        _ => (None, Via::Nothing),
    }
}

fn apply_outcome(headers: &mut HeaderMap, outcome: &Outcome, via: Via, config: &SessionConfig) {
    let (cookie, token) = match outcome {
        Outcome::Nothing | Outcome::Gone => return,
        Outcome::Issue(id) => {
            let id = id.encode();
            (config.set_cookie(id.as_str()), id.as_str().to_string())
        }
        Outcome::IssueToken(t) => (config.set_cookie(t), t.clone()),
        Outcome::Remove => (config.removal_cookie(), String::new()),
    };
    if via != Via::Header {
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            headers.append(header::SET_COOKIE, v);
        }
    }
    // A client that sent its ID in a header gets the new one in a header,
    // even when only bearer tokens were configured.
    let name = match (&config.header, via) {
        (Some(name), _) => Some(name.clone()),
        (None, Via::Header) => Some(http::HeaderName::from_static("x-auth-token")),
        (None, _) => None,
    };
    if let Some(name) = name {
        if via != Via::Cookie {
            if let Ok(v) = HeaderValue::from_str(&token) {
                headers.insert(name, v);
            }
        }
    }
    // A shared cache must never replay one user's session credential to
    // another, whatever caching the handler asked for.
    let shared = headers
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.contains("public") || v.contains("s-maxage"));
    if shared {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private"));
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SessionService<S>
where
    S: Service<Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<axum_core::BoxError>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // The clone that was polled ready is the one to call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        let device = if config.record_device {
            Device::of(req.headers())
        } else {
            Device::default()
        };
        let (id, token, via) = match &self.backend {
            Backend::Store(..) => {
                let (id, via) = incoming(req.headers(), &config);
                (id, None, via)
            }
            Backend::Jwt(_) => {
                let (token, via) = incoming_token(req.headers(), &config);
                (None, token, via)
            }
        };
        let session = Session::new(
            self.backend.clone(),
            config.clone(),
            self.principals.clone(),
            id,
            token,
            device,
        );
        req.extensions_mut().insert(session.clone());

        Box::pin(async move {
            let response = inner.call(req).await?.map(Body::new);
            if session.failed() {
                // The handler met a store failure, whatever it answered: a
                // missing session must not pass for a logged-out user.
                return Ok(error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "session store unavailable: your session is intact, try again shortly\n"
                        .to_string(),
                ));
            }
            if response.status().is_server_error() {
                return Ok(response);
            }
            match session.save().await {
                Ok(Outcome::Gone) => Ok(error_response(
                    StatusCode::CONFLICT,
                    "session ended or was replaced by a concurrent request (logout, login, expiry); \
                     nothing was saved\n"
                        .to_string(),
                )),
                Ok(outcome) => {
                    let mut response = response;
                    apply_outcome(response.headers_mut(), &outcome, via, &config);
                    Ok(response)
                }
                Err(e) => {
                    tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "saving the session failed");
                    Ok(error_response(store_status(&e), store_message(&e)))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(cookies: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for c in cookies {
            h.append(header::COOKIE, HeaderValue::from_str(c).unwrap());
        }
        h
    }

    #[test]
    fn finds_the_session_cookie_among_others() {
        let id = SessionId::random();
        let h = headers(&["theme=dark", &format!("a=1; SESSION={id}; b=2")]);
        assert_eq!(id_from_cookies(&h, "SESSION"), Some(id));
    }

    #[test]
    fn malformed_values_are_no_session() {
        let id = SessionId::random().to_string();
        for bad in [
            format!("SESSION={}", &id[..21]),
            format!("SESSION={id}A"),
            "SESSION=../../etc/passwd".to_string(),
            "SESSION=".to_string(),
            "SESSION".to_string(),
            format!("SESSIONX={id}"),
            format!("session={id}"),
        ] {
            assert_eq!(id_from_cookies(&headers(&[&bad]), "SESSION"), None, "{bad}");
        }
    }

    #[test]
    fn a_forged_value_does_not_hide_a_valid_one() {
        let id = SessionId::random();
        let h = headers(&[&format!("SESSION=forged; SESSION={id}")]);
        assert_eq!(id_from_cookies(&h, "SESSION"), Some(id));
    }
}
