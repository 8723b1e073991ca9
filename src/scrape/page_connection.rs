//! A kept-alive plain HTTP/1.1 connection that GETs one endpoint's `/metrics` page and hands the
//! body to a sink as it arrives.
//!
//! Why not a general client: a scrape is the same small request to the same pod every 50 ms,
//! and at 100 pods that is 2,000 requests a second. Here the request bytes are built once, the
//! response is read into one short-lived 16 KiB buffer owned by the scrape (nothing grows or
//! stays per connection, which matters with 1,000 endpoints), the body goes straight from that
//! buffer to the parser, and no task or channel sits between the scrape loop and its socket.
//! `https` pages go through `reqwest` instead (see the collector).
//!
//! Invariants: a connection is reused only after a response was read to its exact end
//! (`Content-Length` or the last chunk) and the server did not ask to close; any error, timeout
//! (the future dropped mid-read) or unframed body leaves no connection behind. A kept-alive
//! connection the server closed while idle is reopened once, transparently.

use std::net::SocketAddr;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::datastore::ScrapeFailure;

/// Read buffer per scrape; also the largest response head accepted.
const READ_BUFFER_BYTES: usize = 16 * 1024;
/// Response headers read at most.
const MAX_HEADERS: usize = 64;
/// Longest chunk-size line accepted (hex size plus extensions).
const MAX_CHUNK_LINE: usize = 1024;

/// One endpoint's metrics page over a reusable connection.
#[derive(Debug)]
pub struct PageConnection {
    addr: SocketAddr,
    request: Vec<u8>,
    stream: Option<TcpStream>,
}

impl PageConnection {
    /// A connection (opened on first use) to `addr` for `path`.
    pub fn new(addr: SocketAddr, path: &str) -> Self {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nUser-Agent: epp\r\n\r\n");
        Self {
            addr,
            request: request.into_bytes(),
            stream: None,
        }
    }

    /// GET the page, calling `sink` with each piece of the body; at most `max_body` body bytes.
    ///
    /// # Errors
    /// [`ScrapeFailure::Connect`] (cannot connect, reset, or closed mid-response),
    /// [`ScrapeFailure::HttpStatus`] (not 2xx), [`ScrapeFailure::TooLarge`] (body over
    /// `max_body`), [`ScrapeFailure::Parse`] (not an HTTP/1 response).
    pub async fn get(&mut self, max_body: usize, mut sink: impl FnMut(&[u8])) -> Result<(), ScrapeFailure> {
        // Taken out for the exchange: if the future is dropped (timeout) or fails, the
        // connection goes with it.
        let (mut stream, reused) = match self.stream.take() {
            Some(s) => (s, true),
            None => (self.connect().await?, false),
        };
        let mut buf = vec![0u8; READ_BUFFER_BYTES];
        let mut filled = match self.send_and_read_head(&mut stream, &mut buf).await {
            Ok(n) => n,
            // A kept-alive connection the server closed while idle: one fresh attempt.
            Err(HeadError::ClosedBeforeResponse) if reused => {
                stream = self.connect().await?;
                self.send_and_read_head(&mut stream, &mut buf)
                    .await
                    .map_err(HeadError::failure)?
            }
            Err(e) => return Err(e.failure()),
        };

        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let head_len = match response.parse(&buf[..filled]) {
            Ok(httparse::Status::Complete(n)) => n,
            _ => return Err(ScrapeFailure::Parse),
        };
        let status = response.code.unwrap_or(0);
        if !(200..300).contains(&status) {
            return Err(ScrapeFailure::HttpStatus(status));
        }
        // 204 has no body by definition; anything else says how its body ends.
        let framing = if status == 204 {
            Framing::Length(0)
        } else {
            Framing::of(&response)?
        };
        if matches!(framing, Framing::Length(n) if n > max_body) {
            return Err(ScrapeFailure::TooLarge);
        }
        let keep_alive = response.version == Some(1) && !has_token(&response, "connection", "close");

        let mut body = BodyReader::new(framing, max_body);
        let mut start = head_len;
        loop {
            if start < filled {
                body.feed(&buf[start..filled], &mut sink)?;
            }
            if body.is_done() {
                break;
            }
            filled = stream.read(&mut buf).await.map_err(|_| ScrapeFailure::Connect)?;
            start = 0;
            if filled == 0 {
                // End of stream: the end of a close-delimited body, an error for a framed one.
                body.finish_at_eof()?;
                return Ok(());
            }
        }
        if keep_alive && body.ended_exactly() {
            self.stream = Some(stream);
        }
        Ok(())
    }

    async fn connect(&self) -> Result<TcpStream, ScrapeFailure> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|_| ScrapeFailure::Connect)?;
        // The request is one small write; do not hold it back for an ACK.
        stream.set_nodelay(true).map_err(|_| ScrapeFailure::Connect)?;
        Ok(stream)
    }

    /// Write the request and read until the response head is complete; returns the bytes in
    /// `buf` (head and possibly the start of the body).
    async fn send_and_read_head(&self, stream: &mut TcpStream, buf: &mut [u8]) -> Result<usize, HeadError> {
        stream
            .write_all(&self.request)
            .await
            .map_err(|_| HeadError::ClosedBeforeResponse)?;
        let mut filled = 0;
        loop {
            let n = match stream.read(&mut buf[filled..]).await {
                Ok(0) | Err(_) if filled == 0 => return Err(HeadError::ClosedBeforeResponse),
                Ok(0) | Err(_) => return Err(HeadError::Failure(ScrapeFailure::Connect)),
                Ok(n) => n,
            };
            filled += n;
            if memchr::memmem::find(&buf[..filled], b"\r\n\r\n").is_some() {
                return Ok(filled);
            }
            if filled == buf.len() {
                return Err(HeadError::Failure(ScrapeFailure::Parse));
            }
        }
    }
}

/// Why no response head was read.
enum HeadError {
    /// Nothing came back: on a reused connection, the server had closed it.
    ClosedBeforeResponse,
    Failure(ScrapeFailure),
}

impl HeadError {
    fn failure(self) -> ScrapeFailure {
        match self {
            Self::ClosedBeforeResponse => ScrapeFailure::Connect,
            Self::Failure(f) => f,
        }
    }
}

fn header<'h>(response: &'h httparse::Response<'_, '_>, name: &str) -> Option<&'h [u8]> {
    response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// Whether header `name` lists `token` (comma-separated, case-insensitive).
fn has_token(response: &httparse::Response<'_, '_>, name: &str, token: &str) -> bool {
    response
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| h.value.split(|c| *c == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// How the body's end is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    /// Until the server closes the connection.
    UntilClose,
}

impl Framing {
    fn of(response: &httparse::Response<'_, '_>) -> Result<Self, ScrapeFailure> {
        if has_token(response, "transfer-encoding", "chunked") {
            return Ok(Self::Chunked);
        }
        match header(response, "content-length") {
            Some(v) => std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .map(Self::Length)
                .ok_or(ScrapeFailure::Parse),
            None => Ok(Self::UntilClose),
        }
    }
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(usize),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last (zero) chunk: reading trailer lines up to an empty one.
    Trailers,
    Done,
}

/// Turns the bytes after the head into body pieces, enforcing the size cap.
#[derive(Debug)]
struct BodyReader {
    framing: Framing,
    max_body: usize,
    received: usize,
    chunk: ChunkState,
    /// A chunk-size or trailer line split across reads.
    line: Vec<u8>,
    /// Bytes came after the body's end: the connection cannot be trusted with another request.
    overrun: bool,
}

impl BodyReader {
    fn new(framing: Framing, max_body: usize) -> Self {
        Self {
            framing,
            max_body,
            received: 0,
            chunk: ChunkState::Size,
            line: Vec::new(),
            overrun: false,
        }
    }

    fn is_done(&self) -> bool {
        match self.framing {
            Framing::Length(n) => self.received >= n,
            Framing::Chunked => self.chunk == ChunkState::Done,
            Framing::UntilClose => false,
        }
    }

    /// Whether the body ended where its framing said, with nothing extra (the connection can
    /// carry the next request).
    fn ended_exactly(&self) -> bool {
        !self.overrun
            && match self.framing {
                Framing::Length(n) => self.received == n,
                Framing::Chunked => self.chunk == ChunkState::Done,
                Framing::UntilClose => false,
            }
    }

    fn finish_at_eof(&self) -> Result<(), ScrapeFailure> {
        match self.framing {
            Framing::UntilClose => Ok(()),
            _ => Err(ScrapeFailure::Connect),
        }
    }

    fn take(&mut self, data: &[u8], sink: &mut impl FnMut(&[u8])) -> Result<(), ScrapeFailure> {
        self.received += data.len();
        if self.received > self.max_body {
            return Err(ScrapeFailure::TooLarge);
        }
        sink(data);
        Ok(())
    }

    fn feed(&mut self, mut data: &[u8], sink: &mut impl FnMut(&[u8])) -> Result<(), ScrapeFailure> {
        match self.framing {
            Framing::Length(n) => {
                if n > self.max_body {
                    return Err(ScrapeFailure::TooLarge);
                }
                let want = n.saturating_sub(self.received).min(data.len());
                self.overrun |= want < data.len();
                self.take(&data[..want], sink)
            }
            Framing::UntilClose => self.take(data, sink),
            Framing::Chunked => {
                while !data.is_empty() {
                    match self.chunk {
                        ChunkState::Data(left) => {
                            let n = left.min(data.len());
                            self.take(&data[..n], sink)?;
                            data = &data[n..];
                            self.chunk = if n == left {
                                ChunkState::DataEnd
                            } else {
                                ChunkState::Data(left - n)
                            };
                        }
                        ChunkState::DataEnd => {
                            // The CRLF may itself be split: take what is here of it.
                            let Some(line) = self.next_line(&mut data)? else {
                                break;
                            };
                            if !line.is_empty() {
                                return Err(ScrapeFailure::Parse);
                            }
                            self.chunk = ChunkState::Size;
                        }
                        ChunkState::Size => {
                            let Some(line) = self.next_line(&mut data)? else {
                                break;
                            };
                            let size = chunk_size(&line)?;
                            if self.received.saturating_add(size) > self.max_body {
                                return Err(ScrapeFailure::TooLarge);
                            }
                            self.chunk = if size == 0 {
                                ChunkState::Trailers
                            } else {
                                ChunkState::Data(size)
                            };
                        }
                        ChunkState::Trailers => {
                            let Some(line) = self.next_line(&mut data)? else {
                                break;
                            };
                            if line.is_empty() {
                                self.chunk = ChunkState::Done;
                            }
                        }
                        ChunkState::Done => {
                            self.overrun = true;
                            return Ok(());
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// The next CRLF-terminated line (without its CRLF), joining pieces split across reads;
    /// `None` when `data` ends first (the partial line is kept).
    fn next_line(&mut self, data: &mut &[u8]) -> Result<Option<Vec<u8>>, ScrapeFailure> {
        match memchr::memchr(b'\n', data) {
            Some(i) => {
                self.line.extend_from_slice(&data[..i]);
                *data = &data[i + 1..];
                let mut line = std::mem::take(&mut self.line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Ok(Some(line))
            }
            None => {
                self.line.extend_from_slice(data);
                *data = &[];
                if self.line.len() > MAX_CHUNK_LINE {
                    return Err(ScrapeFailure::Parse);
                }
                Ok(None)
            }
        }
    }
}

/// The size of a chunk-size line (`1a2b` or `1a2b;ext=v`).
fn chunk_size(line: &[u8]) -> Result<usize, ScrapeFailure> {
    let hex = line.split(|c| *c == b';').next().unwrap_or_default().trim_ascii();
    std::str::from_utf8(hex)
        .ok()
        .filter(|h| !h.is_empty() && h.len() <= 15)
        .and_then(|h| usize::from_str_radix(h, 16).ok())
        .ok_or(ScrapeFailure::Parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(framing: Framing, pieces: &[&[u8]], max: usize) -> (Result<(), ScrapeFailure>, Vec<u8>, bool) {
        let mut out = Vec::new();
        let mut r = BodyReader::new(framing, max);
        for p in pieces {
            if let Err(e) = r.feed(p, &mut |d: &[u8]| out.extend_from_slice(d)) {
                return (Err(e), out, false);
            }
        }
        (Ok(()), out, r.ended_exactly())
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let wire: &[u8] = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: y\r\n\r\n";
        for cut in 0..=wire.len() {
            for cut2 in cut..=wire.len() {
                let (r, out, exact) = decode(
                    Framing::Chunked,
                    &[&wire[..cut], &wire[cut..cut2], &wire[cut2..]],
                    100,
                );
                assert_eq!(r, Ok(()), "cut at {cut}/{cut2}");
                assert_eq!(out, b"hello, world", "cut at {cut}/{cut2}");
                assert!(exact);
            }
        }
    }

    #[test]
    fn bad_chunk_framing_and_oversize_bodies_are_errors() {
        assert_eq!(
            decode(Framing::Chunked, &[b"zz\r\n"], 100).0,
            Err(ScrapeFailure::Parse)
        );
        assert_eq!(
            decode(Framing::Chunked, &[b"3\r\nabcX\r\n"], 100).0,
            Err(ScrapeFailure::Parse)
        );
        assert_eq!(
            decode(Framing::Chunked, &[b"ff\r\n"], 100).0,
            Err(ScrapeFailure::TooLarge)
        );
        assert_eq!(
            decode(Framing::Chunked, &[&[b'1'; 2000]], 100).0,
            Err(ScrapeFailure::Parse),
            "endless size line"
        );
        assert_eq!(
            decode(Framing::Length(200), &[b"abc"], 100).0,
            Err(ScrapeFailure::TooLarge)
        );
        assert_eq!(
            decode(Framing::UntilClose, &[&[b'a'; 101]], 100).0,
            Err(ScrapeFailure::TooLarge)
        );
    }

    #[test]
    fn a_length_body_stops_at_its_length() {
        let (r, out, exact) = decode(Framing::Length(5), &[b"hel", b"lo"], 100);
        assert_eq!((r, out.as_slice(), exact), (Ok(()), &b"hello"[..], true));
        let (r, out, exact) = decode(Framing::Length(5), &[b"hel", b"loEXTRA"], 100);
        assert_eq!(
            (r, out.as_slice(), exact),
            (Ok(()), &b"hello"[..], false),
            "not reusable"
        );
        let (_, _, exact) = decode(Framing::Length(5), &[b"hel"], 100);
        assert!(!exact);
    }
}
