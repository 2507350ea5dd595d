//! Response compression: gzip, brotli and zstd, negotiated from Accept-Encoding and applied
//! frame by frame on the way out (`proxy.rs` calls [`apply`] on the final response, after
//! the route's plugins, so body hooks see the body as the upstream sent it).
//!
//! Streaming: the encoder is flushed whenever the upstream has nothing more to give right
//! now, so server-sent events and other slow streams reach the client chunk by chunk, and
//! a fast body is not flushed after every frame (which would cost ratio and frames).

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use http_body::{Body, Frame, SizeHint};
use serde::Deserialize;
use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The codings the gateway produces, named as in Content-Encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    Zstd,
    Br,
    Gzip,
}

impl Encoding {
    fn token(self) -> &'static str {
        match self {
            Encoding::Zstd => "zstd",
            Encoding::Br => "br",
            Encoding::Gzip => "gzip",
        }
    }

    fn header(self) -> HeaderValue {
        HeaderValue::from_static(self.token())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Levels {
    pub gzip: u32,
    pub br: u32,
    pub zstd: i32,
}

/// `routes[].compression` of the normalized config: the route's effective settings (the
/// control plane merged the top-level ones in); absent when the route does not compress.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CompressionConfig {
    /// Server preference among codings the client accepts with equal q.
    pub encodings: Vec<Encoding>,
    /// Bytes; a response whose Content-Length is below it is sent as it is.
    pub min_size: u64,
    /// Media types (`type/subtype`, or `type/*`), lower case.
    pub types: Vec<String>,
    pub level: Levels,
}

/// A route's compression settings, compiled.
#[derive(Debug)]
pub struct Policy {
    encodings: Vec<Encoding>,
    min_size: u64,
    exact: Vec<String>,
    prefixes: Vec<String>,
    levels: Levels,
}

impl Policy {
    pub fn new(c: &CompressionConfig) -> Policy {
        let (mut exact, mut prefixes) = (Vec::new(), Vec::new());
        for t in &c.types {
            match t.strip_suffix("/*") {
                Some(p) => prefixes.push(format!("{p}/")),
                None => exact.push(t.clone()),
            }
        }
        Policy {
            encodings: c.encodings.clone(),
            min_size: c.min_size,
            exact,
            prefixes,
            levels: c.level,
        }
    }

    /// Whether the Content-Type names one of the listed media types.
    fn compressible(&self, content_type: &[u8]) -> bool {
        let Ok(ct) = std::str::from_utf8(content_type) else {
            return false;
        };
        let media = ct.split(';').next().unwrap_or("").trim();
        let is = |t: &str| media.eq_ignore_ascii_case(t);
        let starts = |p: &str| media.len() > p.len() && media[..p.len()].eq_ignore_ascii_case(p);
        self.exact.iter().any(|t| is(t)) || self.prefixes.iter().any(|p| starts(p))
    }
}

/// What [`apply`] needs to know of the request.
pub struct RequestSide {
    pub head: bool,
    pub accept: Option<Vec<HeaderValue>>,
}

impl RequestSide {
    pub fn of(method: &Method, headers: &HeaderMap) -> RequestSide {
        let mut values = headers.get_all(header::ACCEPT_ENCODING).iter().peekable();
        RequestSide {
            head: method == Method::HEAD,
            accept: values.peek().is_some().then(|| values.cloned().collect()),
        }
    }
}

/// The q-value of each listed coding, from every Accept-Encoding field of the request.
#[derive(Debug, Default)]
struct Accepted {
    /// Thousandths, as the q grammar allows three decimals.
    codings: Vec<(Encoding, u16)>,
    star: Option<u16>,
    identity: Option<u16>,
}

fn parse_q(s: &str) -> Option<u16> {
    let s = s.trim();
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut thousandths: u16 = match int {
        "0" => 0,
        "1" => 1000,
        _ => return None,
    };
    for (i, b) in frac.bytes().enumerate() {
        thousandths += u16::from(b - b'0') * [100, 10, 1][i];
    }
    (thousandths <= 1000).then_some(thousandths)
}

fn parse_accept(values: &[HeaderValue]) -> Accepted {
    let mut out = Accepted::default();
    for v in values {
        let Ok(v) = v.to_str() else { continue };
        for item in v.split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
            if name.is_empty() {
                continue;
            }
            let mut q = Some(1000);
            for p in parts {
                if let Some((k, val)) = p.split_once('=') {
                    if k.trim().eq_ignore_ascii_case("q") {
                        q = parse_q(val);
                    }
                }
            }
            // A malformed q makes the item meaningless; skip it rather than guess.
            let Some(q) = q else { continue };
            let coding = if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
                Some(Encoding::Gzip)
            } else if name.eq_ignore_ascii_case("br") {
                Some(Encoding::Br)
            } else if name.eq_ignore_ascii_case("zstd") {
                Some(Encoding::Zstd)
            } else {
                None
            };
            match coding {
                Some(c) => out.codings.push((c, q)),
                None if name == "*" => out.star = Some(q),
                None if name.eq_ignore_ascii_case("identity") => out.identity = Some(q),
                None => {}
            }
        }
    }
    out
}

/// The coding to use: the highest q the client gave among `preferred` (`*` covers codings
/// it did not name; q=0 refuses), ties broken by the order of `preferred`. None when the
/// client accepts none of them, or explicitly prefers the identity coding.
pub fn negotiate(values: &[HeaderValue], preferred: &[Encoding]) -> Option<Encoding> {
    let accepted = parse_accept(values);
    let q_of = |e: Encoding| {
        accepted
            .codings
            .iter()
            .filter(|(c, _)| *c == e)
            .map(|(_, q)| *q)
            .max()
            .or(accepted.star)
            .unwrap_or(0)
    };
    let mut best: Option<(Encoding, u16)> = None;
    for &e in preferred {
        let q = q_of(e);
        let better = match best {
            None => q > 0,
            Some((_, b)) => q > b,
        };
        if better {
            best = Some((e, q));
        }
    }
    let (e, q) = best?;
    match accepted.identity.or(accepted.star) {
        Some(identity) if identity > q => None,
        _ => Some(e),
    }
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            t.eq_ignore_ascii_case(token) || t == "*"
        })
}

static ACCEPT_ENCODING: HeaderValue = HeaderValue::from_static("Accept-Encoding");

/// Add `Accept-Encoding` to Vary, in the same field as what is there.
fn vary_on_accept_encoding(headers: &mut HeaderMap) {
    if has_token(headers, header::VARY, "accept-encoding") {
        return;
    }
    let existing: Vec<&str> = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let merged = if existing.is_empty() {
        ACCEPT_ENCODING.clone()
    } else {
        let joined = format!("{}, Accept-Encoding", existing.join(", "));
        HeaderValue::from_str(&joined).unwrap_or_else(|_| ACCEPT_ENCODING.clone())
    };
    headers.insert(header::VARY, merged);
}

/// A strong validator names exact bytes; the compressed bytes differ, so it becomes weak.
fn weaken_etag(headers: &mut HeaderMap) {
    if let Some(etag) = headers.get(header::ETAG) {
        let b = etag.as_bytes();
        if b.starts_with(b"\"") {
            let mut weak = Vec::with_capacity(b.len() + 2);
            weak.extend_from_slice(b"W/");
            weak.extend_from_slice(b);
            if let Ok(v) = HeaderValue::from_bytes(&weak) {
                headers.insert(header::ETAG, v);
            }
        }
    }
}

/// Decide for one response, and change its head if it is to be compressed: the coding to
/// wrap its body in, or None (the head may still have gained `Vary`).
pub fn apply(
    policy: &Policy,
    req: &RequestSide,
    status: StatusCode,
    headers: &mut HeaderMap,
    body_empty: bool,
) -> Option<Encoding> {
    if status.is_informational()
        || matches!(
            status,
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED | StatusCode::PARTIAL_CONTENT
        )
        || headers.contains_key(header::CONTENT_RANGE)
    {
        return None;
    }
    // Already encoded by the upstream (or a plugin): never twice, and its Vary is its own.
    let encoded = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if encoded || has_token(headers, header::CACHE_CONTROL, "no-transform") {
        return None;
    }
    let typed = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| policy.compressible(ct.as_bytes()));
    if !typed {
        return None;
    }
    // The same URL may be sent compressed or not depending on the request's header.
    vary_on_accept_encoding(headers);
    if req.head || body_empty {
        return None;
    }
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if length.is_some_and(|n| n < policy.min_size) {
        return None;
    }
    let encoding = negotiate(req.accept.as_deref()?, &policy.encodings)?;
    headers.remove(header::CONTENT_ENCODING);
    headers.insert(header::CONTENT_ENCODING, encoding.header());
    headers.remove(header::CONTENT_LENGTH);
    // Byte ranges offered refer to the identity bytes (nginx drops the field likewise).
    headers.remove(header::ACCEPT_RANGES);
    weaken_etag(headers);
    Some(encoding)
}

/// Sliding window sizes: enough for API bodies, and a bounded footprint per stream.
const BROTLI_LGWIN: u32 = 19;
const ZSTD_WINDOW_LOG: u32 = 19;
/// Compressed bytes held before they are handed on even while the upstream keeps up.
const YIELD_AT: usize = 32 * 1024;

/// gzip over a raw deflate stream whose state is reused: setting one up allocates and
/// clears about 300 KiB, which per response cost more than compressing a 16 KiB body.
struct Gzip {
    deflate: Option<flate2::Compress>,
    level: u32,
    crc: flate2::Crc,
    out: Vec<u8>,
}

/// Idle compression states kept per worker thread and coding.
const POOL_MAX: usize = 8;

thread_local! {
    static GZIP_POOL: std::cell::RefCell<Vec<(u32, flate2::Compress)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The fixed gzip member header: deflate, no name, no time, unknown OS.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];

impl Gzip {
    fn new(level: u32) -> Gzip {
        let pooled = GZIP_POOL.with(|p| {
            let mut pool = p.borrow_mut();
            let i = pool.iter().position(|(l, _)| *l == level)?;
            Some(pool.swap_remove(i).1)
        });
        let deflate = pooled.unwrap_or_else(|| flate2::Compress::new(flate2::Compression::new(level), false));
        Gzip {
            deflate: Some(deflate),
            level,
            crc: flate2::Crc::new(),
            out: GZIP_HEADER.to_vec(),
        }
    }

    /// Run the deflate stream over `input` with `flush` until it has taken all of it and
    /// has no more to give.
    fn run(&mut self, mut input: &[u8], flush: flate2::FlushCompress) -> std::io::Result<()> {
        let d = self.deflate.as_mut().expect("used after finish");
        loop {
            self.out.reserve(input.len() / 2 + 1024);
            let before_in = d.total_in();
            let status = d
                .compress_vec(input, &mut self.out, flush)
                .map_err(std::io::Error::other)?;
            input = &input[(d.total_in() - before_in) as usize..];
            let room_left = self.out.len() < self.out.capacity();
            match status {
                flate2::Status::StreamEnd => return Ok(()),
                _ if input.is_empty() && room_left && flush != flate2::FlushCompress::Finish => return Ok(()),
                _ => {}
            }
        }
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.crc.update(data);
        self.run(data, flate2::FlushCompress::None)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.run(&[], flate2::FlushCompress::Sync)
    }

    fn finish(mut self) -> std::io::Result<Vec<u8>> {
        self.run(&[], flate2::FlushCompress::Finish)?;
        let mut out = std::mem::take(&mut self.out);
        out.extend_from_slice(&self.crc.sum().to_le_bytes());
        out.extend_from_slice(&self.crc.amount().to_le_bytes());
        Ok(out)
    }
}

impl Drop for Gzip {
    fn drop(&mut self) {
        if let Some(mut d) = self.deflate.take() {
            d.reset();
            GZIP_POOL.with(|p| {
                let mut pool = p.borrow_mut();
                if pool.len() < POOL_MAX {
                    pool.push((self.level, d));
                }
            });
        }
    }
}

/// gzip of a body whose whole, small length is declared: gathered, then deflated in one
/// go by [`crate::deflate`], which at level 1 costs about 60% of a zlib-rs stream's CPU on
/// a 16 KiB body (bench/compression). Such a body is held until its last byte, as nginx's
/// gzip holds its buffers; longer bodies, and bodies of unknown length (server-sent
/// events), stream.
struct WholeGzip {
    /// The body while it arrives in a single frame (no copy), then its bytes so far.
    first: Option<Bytes>,
    rest: Vec<u8>,
    /// Stays empty: nothing goes out before the end (what [`Encoder::output`] shows).
    out: Vec<u8>,
}

/// Level at which a gzip body of known length below [`crate::deflate::MAX_INPUT`] is
/// compressed whole: the one-shot encoder makes the same kind of stream as zlib-rs's level
/// 1 (greedy matches, fixed codes), not the better ones of higher levels.
const WHOLE_GZIP_LEVEL: u32 = 1;

impl WholeGzip {
    fn new() -> WholeGzip {
        WholeGzip {
            first: None,
            rest: Vec::new(),
            out: Vec::new(),
        }
    }

    fn push(&mut self, data: Bytes) {
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(data);
            return;
        }
        if let Some(first) = self.first.take() {
            self.rest.extend_from_slice(&first);
        }
        self.rest.extend_from_slice(&data);
    }

    fn finish(self) -> std::io::Result<Vec<u8>> {
        gzip_whole(self.first.as_deref().unwrap_or(&self.rest))
    }
}

/// One gzip member holding `body`, deflated in one go.
fn gzip_whole(body: &[u8]) -> std::io::Result<Vec<u8>> {
    if body.len() > crate::deflate::MAX_INPUT {
        // More than the body's declared length: compressed as a stream after all.
        let mut g = Gzip::new(WHOLE_GZIP_LEVEL);
        g.write(body)?;
        return g.finish();
    }
    let mut out = Vec::with_capacity(body.len() / 3 + 32);
    out.extend_from_slice(&GZIP_HEADER);
    crate::deflate::compress(body, &mut out);
    let mut crc = flate2::Crc::new();
    crc.update(body);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&crc.amount().to_le_bytes());
    Ok(out)
}

type ZstdWriter = zstd::stream::zio::Writer<Vec<u8>, zstd::stream::raw::Encoder<'static>>;

/// zstd with its compression context reused, for the same reason as [`Gzip`].
struct Zstd {
    writer: Option<ZstdWriter>,
    level: i32,
}

thread_local! {
    static ZSTD_POOL: std::cell::RefCell<Vec<(i32, zstd::stream::raw::Encoder<'static>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl Zstd {
    fn new(level: i32) -> std::io::Result<Zstd> {
        let pooled = ZSTD_POOL.with(|p| {
            let mut pool = p.borrow_mut();
            let i = pool.iter().position(|(l, _)| *l == level)?;
            Some(pool.swap_remove(i).1)
        });
        let encoder = match pooled {
            Some(e) => e,
            None => {
                let mut e = zstd::stream::raw::Encoder::new(level)?;
                e.set_parameter(zstd::stream::raw::CParameter::WindowLog(ZSTD_WINDOW_LOG))?;
                e
            }
        };
        Ok(Zstd {
            writer: Some(zstd::stream::zio::Writer::new(Vec::new(), encoder)),
            level,
        })
    }

    fn writer(&mut self) -> &mut ZstdWriter {
        self.writer.as_mut().expect("used after finish")
    }

    fn finish(mut self) -> std::io::Result<Vec<u8>> {
        let w = self.writer();
        w.finish()?;
        Ok(std::mem::take(w.writer_mut()))
    }
}

impl Drop for Zstd {
    fn drop(&mut self) {
        use zstd::stream::raw::Operation;
        if let Some(w) = self.writer.take() {
            let (_, mut encoder) = w.into_inner();
            if encoder.reinit().is_ok() {
                ZSTD_POOL.with(|p| {
                    let mut pool = p.borrow_mut();
                    if pool.len() < POOL_MAX {
                        pool.push((self.level, encoder));
                    }
                });
            }
        }
    }
}

enum Encoder {
    Gzip(Gzip),
    WholeGzip(WholeGzip),
    Br(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(Zstd),
}

impl Encoder {
    fn new(encoding: Encoding, levels: &Levels) -> std::io::Result<Encoder> {
        Ok(match encoding {
            Encoding::Gzip => Encoder::Gzip(Gzip::new(levels.gzip)),
            Encoding::Br => Encoder::Br(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                8 * 1024,
                levels.br,
                BROTLI_LGWIN,
            ))),
            Encoding::Zstd => Encoder::Zstd(Zstd::new(levels.zstd)?),
        })
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.write(data),
            Encoder::WholeGzip(e) => {
                e.push(Bytes::copy_from_slice(data));
                Ok(())
            }
            Encoder::Br(e) => e.write_all(data),
            Encoder::Zstd(e) => e.writer().write_all(data),
        }
    }

    /// Everything written so far becomes decodable output (a sync flush).
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.flush(),
            // Nothing goes out before the last byte has come.
            Encoder::WholeGzip(_) => Ok(()),
            Encoder::Br(e) => e.flush(),
            Encoder::Zstd(e) => e.writer().flush(),
        }
    }

    fn output(&mut self) -> &mut Vec<u8> {
        match self {
            Encoder::Gzip(e) => &mut e.out,
            Encoder::WholeGzip(e) => &mut e.out,
            Encoder::Br(e) => e.get_mut(),
            Encoder::Zstd(e) => e.writer().writer_mut(),
        }
    }

    fn take(&mut self) -> Bytes {
        Bytes::from(std::mem::take(self.output()))
    }

    fn finish(self) -> std::io::Result<Vec<u8>> {
        match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::WholeGzip(e) => e.finish(),
            Encoder::Br(e) => Ok(e.into_inner()),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

/// A body compressed on the fly. Frames other than data (trailers) pass through after the
/// compressed stream has ended.
pub struct Compressed<B> {
    inner: B,
    encoder: Option<Encoder>,
    /// Data written since the last flush.
    dirty: bool,
    trailers: Option<Frame<Bytes>>,
}

impl Levels {
    fn of(&self, encoding: Encoding) -> i32 {
        match encoding {
            Encoding::Gzip => self.gzip as i32,
            Encoding::Br => self.br as i32,
            Encoding::Zstd => self.zstd,
        }
    }
}

impl Policy {
    /// A whole body compressed in one go, for bodies that are sent many times (cache hits).
    pub fn encode_whole(&self, encoding: Encoding, data: &[u8]) -> std::io::Result<Bytes> {
        if encoding == Encoding::Gzip && self.gzip_whole(data.len() as u64) {
            return gzip_whole(data).map(Bytes::from);
        }
        let mut encoder = Encoder::new(encoding, &self.levels)?;
        encoder.write(data)?;
        Ok(Bytes::from(encoder.finish()?))
    }

    /// Whether a gzip body of `len` bytes is compressed whole (see [`WholeGzip`]).
    fn gzip_whole(&self, len: u64) -> bool {
        self.levels.gzip == WHOLE_GZIP_LEVEL && len <= crate::deflate::MAX_INPUT as u64
    }

    /// What tells one compressed form of a body from another: the coding and its level.
    pub fn variant(&self, encoding: Encoding) -> (Encoding, i32) {
        (encoding, self.levels.of(encoding))
    }
}

impl<B: Body> Compressed<B> {
    pub fn new(inner: B, encoding: Encoding, policy: &Policy) -> std::io::Result<Self> {
        let whole =
            encoding == Encoding::Gzip && inner.size_hint().exact().is_some_and(|n| policy.gzip_whole(n));
        let encoder = if whole {
            Encoder::WholeGzip(WholeGzip::new())
        } else {
            Encoder::new(encoding, &policy.levels)?
        };
        Ok(Compressed {
            inner,
            encoder: Some(encoder),
            dirty: false,
            trailers: None,
        })
    }
}

impl<B> Body for Compressed<B>
where
    B: Body<Data = Bytes, Error = std::io::Error> + Unpin,
{
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            let mut ended = false;
            let Some(encoder) = this.encoder.as_mut() else {
                return Poll::Ready(this.trailers.take().map(Ok));
            };
            if encoder.output().len() >= YIELD_AT {
                return Poll::Ready(Some(Ok(Frame::data(encoder.take()))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {
                    // The upstream is waiting: what it sent so far goes out now.
                    if this.dirty {
                        encoder.flush()?;
                        this.dirty = false;
                    }
                    if encoder.output().is_empty() {
                        return Poll::Pending;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(encoder.take()))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) => match encoder {
                        Encoder::WholeGzip(e) => e.push(data),
                        _ => {
                            encoder.write(&data)?;
                            this.dirty = true;
                        }
                    },
                    Err(other) => this.trailers = Some(other),
                },
                Poll::Ready(None) => ended = true,
            }
            if ended || this.trailers.is_some() || this.inner.is_end_stream() {
                let encoder = this.encoder.take().expect("checked above");
                let last = encoder.finish()?;
                if !last.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(last)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.encoder.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Encoding; 3] = [Encoding::Zstd, Encoding::Br, Encoding::Gzip];

    fn pick(accept: &str) -> Option<Encoding> {
        negotiate(&[HeaderValue::from_str(accept).unwrap()], &ALL)
    }

    #[test]
    fn q_values_pick_the_coding() {
        assert_eq!(pick("gzip"), Some(Encoding::Gzip));
        assert_eq!(pick("gzip, br"), Some(Encoding::Br));
        assert_eq!(pick("gzip, br, zstd"), Some(Encoding::Zstd));
        assert_eq!(pick("zstd;q=0.5, gzip;q=0.8"), Some(Encoding::Gzip));
        assert_eq!(pick("br;q=0, gzip;q=0.1"), Some(Encoding::Gzip));
        assert_eq!(pick("br;q=0"), None);
        assert_eq!(pick("*"), Some(Encoding::Zstd));
        assert_eq!(pick("*;q=0.5, zstd;q=0"), Some(Encoding::Br));
        assert_eq!(pick("deflate"), None);
        assert_eq!(pick(""), None);
        assert_eq!(pick("x-gzip"), Some(Encoding::Gzip));
        assert_eq!(pick("GZIP;Q=1.000"), Some(Encoding::Gzip));
        assert_eq!(pick("gzip;q=0.5, identity"), None);
        assert_eq!(pick("gzip, identity;q=0"), Some(Encoding::Gzip));
        assert_eq!(pick("gzip;q=2"), None);
        assert_eq!(pick("gzip;q=0.0001"), None);
    }

    #[test]
    fn q_parsing() {
        assert_eq!(parse_q("0.5"), Some(500));
        assert_eq!(parse_q("1"), Some(1000));
        assert_eq!(parse_q("1.0"), Some(1000));
        assert_eq!(parse_q("1.5"), None);
        assert_eq!(parse_q("0.125"), Some(125));
        assert_eq!(parse_q("abc"), None);
    }

    #[test]
    fn vary_is_merged_once() {
        let mut h = HeaderMap::new();
        h.append(header::VARY, HeaderValue::from_static("Origin"));
        h.append(header::VARY, HeaderValue::from_static("Cookie"));
        vary_on_accept_encoding(&mut h);
        assert_eq!(h.get(header::VARY).unwrap(), "Origin, Cookie, Accept-Encoding");
        assert_eq!(h.get_all(header::VARY).iter().count(), 1);
        vary_on_accept_encoding(&mut h);
        assert_eq!(h.get(header::VARY).unwrap(), "Origin, Cookie, Accept-Encoding");
        let mut star = HeaderMap::new();
        star.insert(header::VARY, HeaderValue::from_static("*"));
        vary_on_accept_encoding(&mut star);
        assert_eq!(star.get(header::VARY).unwrap(), "*");
    }

    #[test]
    fn only_strong_etags_are_weakened() {
        let mut h = HeaderMap::new();
        h.insert(header::ETAG, HeaderValue::from_static("\"abc\""));
        weaken_etag(&mut h);
        assert_eq!(h.get(header::ETAG).unwrap(), "W/\"abc\"");
        weaken_etag(&mut h);
        assert_eq!(h.get(header::ETAG).unwrap(), "W/\"abc\"");
    }

    /// Frames, with `None` standing for one `Pending` (woken at once), and the length the
    /// body declares, if any (as one with Content-Length does).
    struct Script(std::collections::VecDeque<Option<&'static [u8]>>, Option<u64>);

    impl Body for Script {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.0.pop_front() {
                None => Poll::Ready(None),
                Some(None) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                Some(Some(d)) => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(d))))),
            }
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }

        fn size_hint(&self) -> SizeHint {
            self.1.map(SizeHint::with_exact).unwrap_or_default()
        }
    }

    fn decode(encoding: Encoding, data: &[u8]) -> Vec<u8> {
        use std::io::Read;
        let mut out = Vec::new();
        match encoding {
            Encoding::Gzip => flate2::read::GzDecoder::new(data).read_to_end(&mut out),
            Encoding::Br => brotli::Decompressor::new(data, 4096).read_to_end(&mut out),
            Encoding::Zstd => zstd::stream::read::Decoder::new(data)
                .unwrap()
                .read_to_end(&mut out),
        }
        .unwrap();
        out
    }

    #[tokio::test]
    async fn a_pause_upstream_flushes_what_came_before_it() {
        use http_body_util::BodyExt;
        let policy = Policy::new(&CompressionConfig {
            encodings: ALL.to_vec(),
            min_size: 0,
            types: vec![],
            level: Levels {
                gzip: 4,
                br: 4,
                zstd: 3,
            },
        });
        for encoding in ALL {
            let script = Script(
                [
                    Some(&b"first "[..]),
                    Some(b"event"),
                    None,
                    Some(b" then the rest"),
                ]
                .into(),
                None,
            );
            let mut body = Compressed::new(script, encoding, &policy).unwrap();
            let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
            // Decodable on its own: the two frames before the pause, not the rest.
            let mut so_far = first.to_vec();
            let mut out = Vec::new();
            if encoding == Encoding::Gzip {
                let mut d = flate2::Decompress::new_with_window_bits(false, 15);
                let mut buf = vec![0u8; 1024];
                d.decompress(&first[10..], &mut buf, flate2::FlushDecompress::Sync)
                    .unwrap();
                out.extend_from_slice(&buf[..d.total_out() as usize]);
                assert_eq!(out, b"first event", "{encoding:?}");
            }
            while let Some(frame) = body.frame().await {
                so_far.extend_from_slice(&frame.unwrap().into_data().unwrap());
            }
            assert!(body.is_end_stream());
            assert_eq!(
                decode(encoding, &so_far),
                b"first event then the rest",
                "{encoding:?}"
            );
        }
    }

    fn gzip_at(level: u32) -> Policy {
        Policy::new(&CompressionConfig {
            encodings: vec![Encoding::Gzip],
            min_size: 0,
            types: vec![],
            level: Levels {
                gzip: level,
                br: 4,
                zstd: 3,
            },
        })
    }

    #[tokio::test]
    async fn a_small_declared_body_is_compressed_whole_at_level_1() {
        use http_body_util::BodyExt;
        let parts: [&'static [u8]; 3] = [
            b"{\"a\": [1, 2, 3], ",
            b"\"b\": [1, 2, 3], ",
            b"\"c\": [1, 2, 3]}",
        ];
        let whole: Vec<u8> = parts.concat();
        for (level, declared, whole_mode) in [
            (1, Some(whole.len() as u64), true),
            (1, None, false),
            (1, Some(crate::deflate::MAX_INPUT as u64 + 1), false),
            (4, Some(whole.len() as u64), false),
        ] {
            let frames = [Some(parts[0]), None, Some(parts[1]), None, Some(parts[2])];
            let script = Script(frames.into(), declared);
            let policy = gzip_at(level);
            let mut body = Compressed::new(script, Encoding::Gzip, &policy).unwrap();
            let mut frames = Vec::new();
            while let Some(frame) = body.frame().await {
                frames.push(frame.unwrap().into_data().unwrap());
            }
            // Held whole: one frame at the end. Streamed: the pauses flushed what came before.
            assert_eq!(
                frames.len() == 1,
                whole_mode,
                "level {level}, declared {declared:?}"
            );
            assert_eq!(decode(Encoding::Gzip, &frames.concat()), whole, "level {level}");
        }
    }

    #[test]
    fn cache_entries_at_level_1_are_encoded_whole_and_decode() {
        let body: Vec<u8> = (0..2000)
            .flat_map(|i: u32| format!("{{\"n\": {}}},", i % 97).into_bytes())
            .collect();
        for level in [1, 6] {
            let encoded = gzip_at(level).encode_whole(Encoding::Gzip, &body).unwrap();
            assert_eq!(decode(Encoding::Gzip, &encoded), body, "level {level}");
            assert!(encoded.len() * 4 < body.len(), "level {level}: {}", encoded.len());
        }
        // Longer than the one-shot encoder takes: streamed through zlib-rs instead.
        let big = vec![b'x'; crate::deflate::MAX_INPUT + 10];
        assert_eq!(gzip_whole(&big).map(|g| decode(Encoding::Gzip, &g)).unwrap(), big);
    }

    #[test]
    fn types_match_by_media_type() {
        let p = Policy::new(&CompressionConfig {
            encodings: ALL.to_vec(),
            min_size: 0,
            types: vec!["application/json".into(), "text/*".into()],
            level: Levels {
                gzip: 4,
                br: 4,
                zstd: 3,
            },
        });
        assert!(p.compressible(b"application/json"));
        assert!(p.compressible(b"Application/JSON; charset=utf-8"));
        assert!(p.compressible(b"text/html"));
        assert!(!p.compressible(b"text/"));
        assert!(!p.compressible(b"image/png"));
        assert!(!p.compressible(b"application/jsonx"));
    }
}
