//! Body relay for HTTP/1.1 clients: a streamed request body to the backend,
//! a response body to the client.

use std::io::Write as _;
use std::time::Instant;

use bytes::Buf;
use tokio::io::AsyncWriteExt;

use super::http1::{Client, Relayed, StreamError};
use super::response::Answer;
use super::{arm, fill, timed, Io, SEND_TIMEOUT};
use crate::h1::{Chunks, Framing};
use crate::upstream::Conn;

impl<S: Io> Client<S> {
    /// Passes a streamed request body from the client to the backend. A
    /// chunked body is re-chunked: the backend sees the balancer's framing
    /// only, never the client's extensions or trailers (a backend that
    /// parses those differently could find a second request in them).
    /// `deadline` bounds the whole upload, not each read.
    pub(super) async fn stream_body(
        &mut self,
        up: &mut Conn,
        framing: Framing,
        deadline: Instant,
    ) -> Result<(), StreamError> {
        let mut left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut chunks = Chunks::default();
        let mut staged = Vec::new();
        loop {
            let take = if framing == Framing::Chunked {
                let used = chunks
                    .scan(&self.buf, |data| {
                        let _ = write!(staged, "{:x}\r\n", data.len());
                        staged.extend_from_slice(data);
                        staged.extend_from_slice(b"\r\n");
                    })
                    .map_err(|_| StreamError::Malformed)?;
                if chunks.done() {
                    staged.extend_from_slice(b"0\r\n\r\n");
                }
                used
            } else {
                usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(self.buf.len())
            };
            let piece = if framing == Framing::Chunked {
                &staged[..]
            } else {
                &self.buf[..take]
            };
            if !piece.is_empty() {
                arm(&mut self.timer, Instant::now() + SEND_TIMEOUT);
                match timed(&mut self.timer, up.io.write_all(piece)).await {
                    Some(Ok(())) => {}
                    _ => return Err(StreamError::Backend),
                }
            }
            staged.clear();
            if take > 0 {
                self.buf.advance(take);
                left = left.saturating_sub(take as u64);
            }
            let done = match framing {
                Framing::Chunked => chunks.done(),
                _ => left == 0,
            };
            if done {
                return Ok(());
            }
            arm(&mut self.timer, deadline);
            match timed(&mut self.timer, fill(&mut self.io, &mut self.buf)).await {
                Some(Ok(n)) if n > 0 => {}
                Some(_) => return Err(StreamError::Client),
                None => return Err(StreamError::Slow),
            }
        }
    }

    /// Sends the response head in `out` and relays the body after it.
    pub(super) async fn relay(
        &mut self,
        up: &mut Conn,
        answer: &Answer,
        mut clock: Instant,
    ) -> Relayed {
        let read_timeout = SEND_TIMEOUT;
        let mut left = match answer.framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut chunks = Chunks::default();
        loop {
            // Move what the backend sent into the client's buffer.
            match answer.framing {
                Framing::Empty => {}
                Framing::Length(_) => {
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(up.buf.len());
                    self.out.extend_from_slice(&up.buf[..take]);
                    up.buf.advance(take);
                    left -= take as u64;
                }
                Framing::Chunked => {
                    let out = &mut self.out;
                    let scanned = if answer.dechunk {
                        chunks.scan(&up.buf, |d| out.extend_from_slice(d))
                    } else {
                        chunks.scan(&up.buf, |_| {})
                    };
                    let Ok(used) = scanned else {
                        return Relayed::Broken;
                    };
                    if !answer.dechunk {
                        self.out.extend_from_slice(&up.buf[..used]);
                    }
                    up.buf.advance(used);
                }
                Framing::Close => {
                    self.out.extend_from_slice(&up.buf);
                    up.buf.clear();
                }
            }
            let done = match answer.framing {
                Framing::Empty => true,
                Framing::Length(_) => left == 0,
                Framing::Chunked => chunks.done(),
                Framing::Close => false,
            };
            // Head and body go out together when the body is already here;
            // otherwise nothing is held back while waiting on the backend.
            if !self.out.is_empty() {
                if !self.send_out_by(clock + SEND_TIMEOUT).await {
                    return Relayed::Broken;
                }
                self.out.clear();
            }
            if done {
                return Relayed::Complete;
            }
            clock = Instant::now();
            arm(&mut self.timer, clock + read_timeout);
            match timed(&mut self.timer, fill(&mut up.io, &mut up.buf)).await {
                Some(Ok(n)) if n > 0 => clock = Instant::now(),
                // A close ends a close-delimited body; any other body is cut.
                Some(Ok(_)) if answer.framing == Framing::Close => return Relayed::Complete,
                _ => return Relayed::Broken,
            }
        }
    }
}
