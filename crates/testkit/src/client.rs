use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::Result;

/// An HTTP/1.1 client with keep-alive and a cookie jar.
///
/// The jar ignores host and port: cookies set by one server on `127.0.0.1`
/// are sent to every other, as a browser does for `localhost`. Cloning shares
/// the jar; [`Client::fork`] copies it.
#[derive(Clone)]
pub struct Client {
    http: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
    jar: Arc<Mutex<BTreeMap<String, String>>>,
    timeout: Duration,
}

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Response {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    ///
    /// # Errors
    /// If the body is not JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(&self.body)?)
    }

    /// The `X-Tether-Node` header: which node served the request.
    pub fn node(&self) -> Option<String> {
        self.header("x-tether-node")
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// Every `Set-Cookie` header.
    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect()
    }
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    /// A client with an empty jar and a 10 s per-request timeout.
    pub fn new() -> Self {
        Self::build(None)
    }

    /// A client whose connections leave from `ip` (any 127.x.y.z works on
    /// Linux loopback), to look like a different client address.
    pub fn from_address(ip: IpAddr) -> Self {
        Self::build(Some(ip))
    }

    fn build(local: Option<IpAddr>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_local_address(local);
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self {
            http,
            jar: Arc::default(),
            timeout: Duration::from_secs(10),
        }
    }

    /// A client with its own copy of this client's jar.
    pub fn fork(&self) -> Self {
        let jar = self.jar.lock().expect("jar lock").clone();
        Self {
            http: self.http.clone(),
            jar: Arc::new(Mutex::new(jar)),
            timeout: self.timeout,
        }
    }

    /// The value of cookie `name` in the jar.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.jar.lock().expect("jar lock").get(name).cloned()
    }

    /// Puts a cookie in the jar (to forge or replay one).
    pub fn set_cookie(&self, name: &str, value: &str) {
        self.jar
            .lock()
            .expect("jar lock")
            .insert(name.into(), value.into());
    }

    /// Empties the jar.
    pub fn clear_cookies(&self) {
        self.jar.lock().expect("jar lock").clear();
    }

    /// `GET url`.
    ///
    /// # Errors
    /// On connection failure or timeout.
    pub async fn get(&self, url: &str) -> Result<Response> {
        self.send(Method::GET, url, &[], Bytes::new()).await
    }

    /// `POST url` with a JSON body.
    ///
    /// # Errors
    /// On connection failure or timeout.
    pub async fn post_json(&self, url: &str, body: &serde_json::Value) -> Result<Response> {
        let bytes = Bytes::from(serde_json::to_vec(body)?);
        self.send(
            Method::POST,
            url,
            &[("content-type", "application/json")],
            bytes,
        )
        .await
    }

    /// `POST url` with a form body such as `member=7`.
    ///
    /// # Errors
    /// On connection failure or timeout.
    pub async fn post_form(&self, url: &str, body: &str) -> Result<Response> {
        let ct = ("content-type", "application/x-www-form-urlencoded");
        self.send(Method::POST, url, &[ct], Bytes::from(body.to_string()))
            .await
    }

    /// Any request, with extra headers; the jar's cookies are added and
    /// `Set-Cookie` answers update the jar.
    ///
    /// # Errors
    /// On connection failure or timeout.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Response> {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let cookies = {
            let jar = self.jar.lock().expect("jar lock");
            jar.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        if !cookies.is_empty() {
            req = req.header(header::COOKIE, HeaderValue::from_str(&cookies)?);
        }
        let req = req.body(Full::new(body))?;
        let res = tokio::time::timeout(self.timeout, async {
            let res = self.http.request(req).await?;
            let (parts, body) = res.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, crate::Error>(Response {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        })
        .await
        .map_err(|_| format!("request to {url} timed out"))??;
        self.store_cookies(&res);
        Ok(res)
    }

    fn store_cookies(&self, res: &Response) {
        let mut jar = self.jar.lock().expect("jar lock");
        for c in res.set_cookies() {
            let mut parts = c.split(';');
            let Some((name, value)) = parts.next().and_then(|p| p.trim().split_once('=')) else {
                continue;
            };
            let expired = parts.any(|a| {
                let a = a.trim().to_ascii_lowercase();
                a == "max-age=0" || a.starts_with("max-age=-")
            });
            if expired || value.is_empty() {
                jar.remove(name);
            } else {
                jar.insert(name.to_string(), value.to_string());
            }
        }
    }
}
