//! HTTP/1.1 message framing for the proxy path (RFC 9112 §6).
//!
//! Heads are tokenised by `httparse`; this module decides where each body
//! ends, which is where request smuggling lives, so it is strict: a request
//! with both `Content-Length` and `Transfer-Encoding`, disagreeing lengths,
//! or a transfer coding other than `chunked` is refused, and a chunked body
//! must use CRLF line ends with bounded size lines and trailers.

use httparse::Header;

/// Header fields parsed per message; more is a 431 (requests) or a 502.
pub(crate) const MAX_HEADERS: usize = 100;

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// The chunked transfer coding.
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

/// Why a message's framing cannot be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    /// A `Content-Length` that is not one non-negative integer.
    #[error("invalid Content-Length")]
    BadLength,
    /// Both `Content-Length` and `Transfer-Encoding`.
    #[error("both Content-Length and Transfer-Encoding")]
    Conflict,
    /// A coding list whose last coding is not `chunked` (request), or any
    /// coding besides `chunked` (not implemented).
    #[error("unsupported Transfer-Encoding")]
    Coding,
    /// A malformed chunked body.
    #[error("malformed chunked body")]
    Chunk,
}

/// Whether two header names are equal (names are ASCII, case-insensitive).
pub(crate) fn is(name: &str, wanted: &str) -> bool {
    name.eq_ignore_ascii_case(wanted)
}

fn trim(v: &[u8]) -> &[u8] {
    v.trim_ascii()
}

/// The value of every `Content-Length` field, which must agree.
fn content_length(headers: &[Header<'_>]) -> Result<Option<u64>, FrameError> {
    let mut found = None;
    for h in headers.iter().filter(|h| is(h.name, "content-length")) {
        let v = trim(h.value);
        if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
            return Err(FrameError::BadLength);
        }
        let n = v.iter().fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
        match found {
            Some(prev) if prev != n => return Err(FrameError::BadLength),
            _ => found = Some(n),
        }
    }
    Ok(found)
}

/// The transfer codings, in order, as (count, chunked-is-last, only-chunked).
fn codings(headers: &[Header<'_>]) -> (usize, bool, bool) {
    let mut count = 0;
    let mut last_chunked = false;
    let mut chunked = 0;
    for h in headers.iter().filter(|h| is(h.name, "transfer-encoding")) {
        for coding in h.value.split(|b| *b == b',').map(trim) {
            if coding.is_empty() {
                continue;
            }
            count += 1;
            last_chunked = coding.eq_ignore_ascii_case(b"chunked");
            chunked += usize::from(last_chunked);
        }
    }
    (count, last_chunked, count == 1 && chunked == 1)
}

/// A request's body framing (RFC 9112 §6.3, items 3-6, strictly).
pub(crate) fn request_framing(headers: &[Header<'_>], http10: bool) -> Result<Framing, FrameError> {
    let length = content_length(headers)?;
    let (count, last_chunked, only_chunked) = codings(headers);
    if count == 0 {
        return Ok(match length {
            None | Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
        });
    }
    if length.is_some() {
        return Err(FrameError::Conflict);
    }
    if http10 || !last_chunked {
        return Err(FrameError::Chunk);
    }
    if !only_chunked {
        return Err(FrameError::Coding);
    }
    Ok(Framing::Chunked)
}

/// A response's body framing (RFC 9112 §6.3, items 1-7). The balancer
/// writes the framing fields itself, so it passes on only what it can
/// frame: a transfer coding other than a lone `chunked` (which would have to
/// reach the client as it is) and a coding from an HTTP/1.0 server (which
/// cannot have one, RFC 9112 §6.1) are refused.
pub(crate) fn response_framing(
    headers: &[Header<'_>],
    status: u16,
    head_request: bool,
    http10: bool,
) -> Result<Framing, FrameError> {
    if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(Framing::Empty);
    }
    let (count, _, only_chunked) = codings(headers);
    if count > 0 {
        // A length beside the coding is ignored, as the RFC says.
        return if only_chunked && !http10 {
            Ok(Framing::Chunked)
        } else {
            Err(FrameError::Coding)
        };
    }
    Ok(match content_length(headers)? {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::Close,
    })
}

/// Longest chunk-size line (with extensions) and trailer section accepted.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Cs {
    #[default]
    Size,
    /// Whitespace after the size: only more of it, `;` or CR may follow.
    SizeWs,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Walks a chunked body as it streams past, to find its end (and, for a
/// client that cannot take chunks, its payload).
#[derive(Debug, Default)]
pub(crate) struct Chunks {
    state: Cs,
    size: u64,
    digits: u8,
    line: usize,
}

impl Chunks {
    /// Whether the final chunk and trailers have been seen.
    pub(crate) fn done(&self) -> bool {
        self.state == Cs::Done
    }

    /// Consumes framing from `input` up to the end of the body; `data` gets
    /// each payload slice. Returns the bytes consumed: all of `input`, or
    /// fewer when the body ended inside it.
    pub(crate) fn scan(
        &mut self,
        input: &[u8],
        mut data: impl FnMut(&[u8]),
    ) -> Result<usize, FrameError> {
        let mut i = 0;
        while i < input.len() && self.state != Cs::Done {
            let b = input[i];
            self.state = match self.state {
                Cs::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits == 15 {
                            return Err(FrameError::Chunk);
                        }
                        self.digits += 1;
                        let d = (b as char).to_digit(16).unwrap_or(0);
                        self.size = self.size * 16 + u64::from(d);
                        Cs::Size
                    }
                    b';' if self.digits > 0 => Cs::Ext,
                    b' ' | b'\t' if self.digits > 0 => Cs::SizeWs,
                    b'\r' if self.digits > 0 => Cs::SizeLf,
                    _ => return Err(FrameError::Chunk),
                },
                Cs::SizeWs => match b {
                    b' ' | b'\t' => {
                        self.line += 1;
                        if self.line > MAX_CHUNK_LINE {
                            return Err(FrameError::Chunk);
                        }
                        Cs::SizeWs
                    }
                    b';' => Cs::Ext,
                    b'\r' => Cs::SizeLf,
                    _ => return Err(FrameError::Chunk),
                },
                Cs::Ext => match b {
                    b'\r' => Cs::SizeLf,
                    b'\n' | 0..=8 | 10..=31 | 127 => return Err(FrameError::Chunk),
                    _ => {
                        self.line += 1;
                        if self.line > MAX_CHUNK_LINE {
                            return Err(FrameError::Chunk);
                        }
                        Cs::Ext
                    }
                },
                Cs::SizeLf => {
                    if b != b'\n' {
                        return Err(FrameError::Chunk);
                    }
                    self.line = 0;
                    if self.size == 0 {
                        Cs::TrailerStart
                    } else {
                        Cs::Data
                    }
                }
                Cs::Data => {
                    let n = usize::try_from(self.size)
                        .unwrap_or(usize::MAX)
                        .min(input.len() - i);
                    data(&input[i..i + n]);
                    self.size -= n as u64;
                    i += n;
                    if self.size == 0 {
                        self.state = Cs::DataCr;
                    }
                    continue;
                }
                Cs::DataCr if b == b'\r' => Cs::DataLf,
                Cs::DataLf if b == b'\n' => {
                    self.digits = 0;
                    Cs::Size
                }
                Cs::TrailerStart if b == b'\r' => Cs::EndLf,
                Cs::TrailerStart | Cs::TrailerLine if b != b'\r' && b != b'\n' => {
                    self.line += 1;
                    if self.line > MAX_TRAILERS {
                        return Err(FrameError::Chunk);
                    }
                    Cs::TrailerLine
                }
                Cs::TrailerLine if b == b'\r' => Cs::TrailerLf,
                Cs::TrailerLf if b == b'\n' => Cs::TrailerStart,
                Cs::EndLf if b == b'\n' => Cs::Done,
                _ => return Err(FrameError::Chunk),
            };
            i += 1;
        }
        Ok(i)
    }
}

/// The standard reason phrase for the balancer's own responses.
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        400 => "Bad Request",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h<'a>(pairs: &[(&'a str, &'a str)]) -> Vec<Header<'a>> {
        pairs
            .iter()
            .map(|(n, v)| Header {
                name: n,
                value: v.as_bytes(),
            })
            .collect()
    }

    #[test]
    fn request_framing_is_strict_about_smuggling_shapes() {
        use Framing::*;
        let ok = [
            (vec![], Empty),
            (vec![("Content-Length", "0")], Empty),
            (vec![("Content-Length", "12")], Length(12)),
            (
                vec![("content-length", "7"), ("Content-Length", " 7 ")],
                Length(7),
            ),
            (vec![("Transfer-Encoding", "chunked")], Chunked),
            (vec![("Transfer-Encoding", "Chunked")], Chunked),
        ];
        for (headers, want) in ok {
            assert_eq!(
                request_framing(&h(&headers), false),
                Ok(want),
                "{headers:?}"
            );
        }
        let bad = [
            (
                vec![("Content-Length", "7"), ("Content-Length", "8")],
                FrameError::BadLength,
            ),
            (vec![("Content-Length", "-1")], FrameError::BadLength),
            (vec![("Content-Length", "1,1")], FrameError::BadLength),
            (vec![("Content-Length", "0x10")], FrameError::BadLength),
            (
                vec![("Content-Length", "99999999999999999999")],
                FrameError::BadLength,
            ),
            (
                vec![("Content-Length", "3"), ("Transfer-Encoding", "chunked")],
                FrameError::Conflict,
            ),
            (
                vec![("Transfer-Encoding", "chunked, gzip")],
                FrameError::Chunk,
            ),
            (
                vec![("Transfer-Encoding", "gzip, chunked")],
                FrameError::Coding,
            ),
            (
                vec![
                    ("Transfer-Encoding", "chunked"),
                    ("Transfer-Encoding", "chunked"),
                ],
                FrameError::Coding,
            ),
            (vec![("Transfer-Encoding", "xchunked")], FrameError::Chunk),
        ];
        for (headers, want) in bad {
            assert_eq!(
                request_framing(&h(&headers), false),
                Err(want),
                "{headers:?}"
            );
        }
        assert_eq!(
            request_framing(&h(&[("Transfer-Encoding", "chunked")]), true),
            Err(FrameError::Chunk),
            "HTTP/1.0 has no chunked coding"
        );
    }

    #[test]
    fn response_framing_follows_the_rfc_order() {
        use Framing::*;
        let cl = h(&[("Content-Length", "5")]);
        assert_eq!(response_framing(&cl, 200, false, false), Ok(Length(5)));
        assert_eq!(response_framing(&cl, 200, true, false), Ok(Empty));
        assert_eq!(response_framing(&cl, 304, false, false), Ok(Empty));
        assert_eq!(response_framing(&cl, 204, false, false), Ok(Empty));
        assert_eq!(response_framing(&[], 200, false, false), Ok(Close));
        let te = h(&[("Transfer-Encoding", "chunked"), ("Content-Length", "5")]);
        assert_eq!(response_framing(&te, 200, false, false), Ok(Chunked));
        assert_eq!(
            response_framing(&te, 200, false, true),
            Err(FrameError::Coding)
        );
        for coding in ["gzip, chunked", "gzip"] {
            let gz = h(&[("Transfer-Encoding", coding)]);
            assert_eq!(
                response_framing(&gz, 200, false, false),
                Err(FrameError::Coding)
            );
        }
        let bad = h(&[("Content-Length", "5"), ("Content-Length", "6")]);
        assert_eq!(
            response_framing(&bad, 200, false, false),
            Err(FrameError::BadLength)
        );
    }

    fn scan_all(pieces: &[&[u8]]) -> Result<(Vec<u8>, usize, bool), FrameError> {
        let mut c = Chunks::default();
        let mut payload = Vec::new();
        let mut used = 0;
        for p in pieces {
            used += c.scan(p, |d| payload.extend_from_slice(d))?;
        }
        Ok((payload, used, c.done()))
    }

    #[test]
    fn chunks_are_found_across_any_split() {
        let body: &[u8] =
            b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let whole = body.len() - 4;
        for split in 0..body.len() {
            let (payload, used, done) = scan_all(&[&body[..split], &body[split..]]).unwrap();
            assert!(done);
            assert_eq!(used, whole, "split at {split}");
            assert_eq!(payload, b"Wikipedia in\r\n\r\nchunks.");
        }
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"4\nWiki\r\n",
            b"4\r\nWikiX\r\n",
            b"4\r\nWiki\r\n0\r\n\n",
            b"10000000000000000\r\n",
            b"4 ;\x01\r\n",
            b"5 6\r\n",
            b"5 \"x\r\n",
        ] {
            assert_eq!(
                scan_all(&[bad]),
                Err(FrameError::Chunk),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE + 1));
        assert_eq!(scan_all(&[long.as_bytes()]), Err(FrameError::Chunk));
    }
}
