//! The redirect-to-HTTPS listener (`redirect_http`): every request gets a
//! `308 Permanent Redirect` to the same host and target over HTTPS, then the
//! connection closes. Nothing reaches a backend.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::proxy::request::{origin_form, valid_authority};

/// Time a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest head read.
const MAX_HEAD: usize = 16 * 1024;

/// Accepts and answers until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, https_port: u16) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = tokio::time::timeout(HEAD_TIMEOUT, answer(stream, https_port)).await;
        });
    }
}

/// The `Location` for a request to `host` (a `Host` value) and `target`,
/// or `None` when either is invalid.
pub(crate) fn location(host: &[u8], method: &str, target: &str, https_port: u16) -> Option<String> {
    if !valid_authority(host) {
        return None;
    }
    let (path, authority) = origin_form(method, target)?;
    let authority = authority.map_or(host, str::as_bytes);
    let authority = std::str::from_utf8(authority).ok()?;
    // Keep the name, swap the port for the HTTPS listener's.
    let name = if authority.starts_with('[') {
        &authority[..=authority.find(']')?]
    } else {
        authority.split(':').next()?
    };
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = if path == "*" { "/" } else { path };
    Some(format!("https://{name}{port}{path}"))
}

async fn answer(mut stream: TcpStream, https_port: u16) {
    let mut buf = Vec::with_capacity(4096);
    let location = loop {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut fields);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let host = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("host"));
                break match (req.method, req.path, host) {
                    (Some(m), Some(t), Some(h)) => location(h.value, m, t, https_port),
                    _ => None,
                };
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            _ => break None,
        }
    };
    let reply = match location {
        Some(l) => format!(
            "HTTP/1.1 308 Permanent Redirect\r\nLocation: {l}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
        None => "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
    };
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_keep_host_and_target_and_use_the_https_port() {
        let l = |host: &str, target: &str, port| location(host.as_bytes(), "GET", target, port);
        assert_eq!(
            l("a.example", "/x?y=1", 443).as_deref(),
            Some("https://a.example/x?y=1")
        );
        assert_eq!(
            l("a.example:8080", "/", 8443).as_deref(),
            Some("https://a.example:8443/")
        );
        assert_eq!(l("[::1]:80", "/p", 443).as_deref(), Some("https://[::1]/p"));
        assert_eq!(l("[::1]", "/p", 443).as_deref(), Some("https://[::1]/p"));
        assert_eq!(
            l("x", "http://b.example:81/q", 443).as_deref(),
            Some("https://b.example/q")
        );
        assert_eq!(l("a\"b", "/", 443), None);
        assert_eq!(l("a.example", "nonsense", 443), None);
    }
}
