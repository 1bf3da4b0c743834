//! The balancer's own answers: every refusal is one variant with its status,
//! its body and whether it leaves the connection unusable.

use std::io::Write as _;

/// Why the balancer answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The request line did not parse.
    MalformedHead,
    /// The head is larger than `limits.max_header_bytes` (or has too many fields).
    HeadTooLarge,
    /// The head did not arrive within `limits.header_timeout_ms`.
    HeadTooSlow,
    /// The body did not arrive within `limits.body_timeout_ms`.
    BodyTooSlow,
    /// `Content-Length` / `Transfer-Encoding` that could be read two ways.
    BadFraming,
    /// A transfer coding other than `chunked`.
    CodingNotImplemented,
    /// `CONNECT`: the balancer is not a forward proxy.
    Connect,
    /// A target that is neither origin-form nor a valid absolute-form.
    BadTarget,
    /// No `Host`, several, or one that is not a valid authority.
    BadHost,
    /// An `Expect` other than `100-continue`.
    Expectation,
    /// A chunked body that breaks the chunk syntax.
    MalformedChunks,
    /// Every backend is down (or draining and this request not bound to it).
    NoBackend,
    /// No backend could be connected to.
    Unreachable,
    /// The backend's answer was not valid HTTP, or it hung up before it.
    BadGateway,
    /// The backend did not answer in time.
    Timeout,
}

impl Refusal {
    /// The status sent.
    pub(crate) fn status(self) -> u16 {
        match self {
            Self::MalformedHead
            | Self::BadFraming
            | Self::BadTarget
            | Self::BadHost
            | Self::MalformedChunks => 400,
            Self::HeadTooSlow | Self::BodyTooSlow => 408,
            Self::Connect => 405,
            Self::Expectation => 417,
            Self::HeadTooLarge => 431,
            Self::CodingNotImplemented => 501,
            Self::Unreachable | Self::BadGateway => 502,
            Self::NoBackend => 503,
            Self::Timeout => 504,
        }
    }

    /// The plain-text body sent (and what an operator reads in a trace).
    pub(crate) fn body(self) -> &'static str {
        match self {
            Self::MalformedHead => "400 malformed request head\n",
            Self::HeadTooLarge => "431 request header fields too large\n",
            Self::HeadTooSlow => "408 request head too slow\n",
            Self::BodyTooSlow => "408 request body too slow\n",
            Self::BadFraming => "400 invalid message framing\n",
            Self::CodingNotImplemented => "501 transfer coding not implemented\n",
            Self::Connect => "405 CONNECT is not supported\n",
            Self::BadTarget => "400 bad request target\n",
            Self::BadHost => "400 exactly one valid Host header is required\n",
            Self::Expectation => "417 expectation not supported\n",
            Self::MalformedChunks => "400 malformed chunked body\n",
            Self::NoBackend => "503 no backend available\n",
            Self::Unreachable => "502 no backend could be reached\n",
            Self::BadGateway => "502 backend sent an invalid or incomplete response\n",
            Self::Timeout => "504 backend timed out\n",
        }
    }

    /// Whether the connection closes after this answer whatever the client
    /// asked: the request's own end is unknown or untrustworthy, so nothing
    /// after it can be read as the next request. The others close only when
    /// the exchange says so (a body left unread, `Connection: close`).
    pub(crate) fn closes(self) -> bool {
        !matches!(
            self,
            Self::NoBackend | Self::Unreachable | Self::BadGateway | Self::Timeout
        )
    }
}

/// A refusal as sent on one HTTP/1.1 connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reply {
    pub(crate) refusal: Refusal,
    /// Close the connection after it.
    pub(crate) close: bool,
    /// Answering a HEAD request: no body.
    pub(crate) head: bool,
    /// An HTTP/1.0 client: a kept connection must be said so.
    pub(crate) http10: bool,
}

impl Reply {
    /// The reply to a request with a known request line; it closes the
    /// connection when `close` says so or the refusal demands it.
    pub(crate) fn new(refusal: Refusal, close: bool, head: bool, http10: bool) -> Self {
        Self {
            refusal,
            close: close || refusal.closes(),
            head,
            http10,
        }
    }

    /// A reply before the request line is known: the connection closes.
    pub(crate) fn early(refusal: Refusal) -> Self {
        Self {
            refusal,
            close: true,
            head: false,
            http10: false,
        }
    }

    /// The status sent.
    pub(crate) fn status(&self) -> u16 {
        self.refusal.status()
    }

    /// Writes the whole HTTP/1.1 response into `out`.
    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        out.clear();
        let connection = match (self.close, self.http10) {
            (true, _) => "Connection: close\r\n",
            (false, true) => "Connection: keep-alive\r\n",
            (false, false) => "",
        };
        let body = self.refusal.body();
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{connection}\r\n",
            self.status(),
            crate::h1::reason(self.status()),
            body.len(),
        );
        if !self.head {
            out.extend_from_slice(body.as_bytes());
        }
    }
}
