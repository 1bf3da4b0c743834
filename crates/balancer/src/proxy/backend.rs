//! The backend side of one try, shared by the HTTP/1.1 and HTTP/2 loops:
//! send the request head, then wait for the final response head.

use std::pin::Pin;

use bytes::Buf;
use tokio::io::AsyncWriteExt;
use tokio::time::Sleep;

use super::attempt::Failure;
use super::{fill, timed, MAX_RESPONSE_HEAD};
use crate::h1;
use crate::upstream::Conn;

/// A try that failed: how, and whether the request may not have reached
/// the application (a kept-alive connection the backend had closed).
pub(super) type Failed = (Failure, bool);

/// Writes `head` (and any buffered body behind it) to the backend before
/// the armed `timer` fires.
pub(super) async fn send_head(
    up: &mut Conn,
    timer: &mut Pin<Box<Sleep>>,
    head: &[u8],
    idempotent: bool,
) -> Result<(), Failed> {
    let mut written = 0;
    let sent = timed(timer, async {
        while written < head.len() {
            match up.io.write(&head[written..]).await {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) => return Err(e),
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
    match sent {
        Some(Ok(())) => Ok(()),
        // A kept-alive connection the backend had closed: if not a byte
        // was taken, nothing reached the application.
        Some(Err(_)) => Err((Failure::Broken, up.reused && (written == 0 || idempotent))),
        None => Err((Failure::Timeout, false)),
    }
}

/// Reads until a final response head is complete, skipping interim `1xx`
/// answers (the balancer's business; a `101` is final), and hands it to
/// `on_head`; the head is then consumed from `up.buf`. `on_head` returning
/// `None` means the head is unusable.
pub(super) async fn await_head<R>(
    up: &mut Conn,
    timer: &mut Pin<Box<Sleep>>,
    idempotent: bool,
    on_head: impl FnOnce(&httparse::Response<'_, '_>) -> Option<R>,
) -> Result<R, Failed> {
    let mut on_head = Some(on_head);
    loop {
        if !up.buf.is_empty() {
            let mut fields = [httparse::EMPTY_HEADER; h1::MAX_HEADERS];
            let mut res = httparse::Response::new(&mut fields);
            match res.parse(&up.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let status = res.code.unwrap_or(0);
                    if (100..200).contains(&status) && status != 101 {
                        up.buf.advance(n);
                        continue;
                    }
                    let decided = on_head.take().and_then(|f| f(&res));
                    let Some(r) = decided else {
                        return Err((Failure::Broken, false));
                    };
                    up.buf.advance(n);
                    return Ok(r);
                }
                Ok(httparse::Status::Partial) if up.buf.len() < MAX_RESPONSE_HEAD => {}
                Ok(httparse::Status::Partial) | Err(_) => return Err((Failure::Broken, false)),
            }
        }
        let nothing_yet = up.buf.is_empty();
        match timed(timer, fill(&mut up.io, &mut up.buf)).await {
            Some(Ok(n)) if n > 0 => {}
            // Closed or reset before any response byte.
            Some(_) => return Err((Failure::Broken, nothing_yet && up.reused && idempotent)),
            None => return Err((Failure::Timeout, false)),
        }
    }
}
