//! gRPC-Web (grpc/doc/PROTOCOL-WEB.md): browsers' calls, over HTTP/1.1 or HTTP/2, turned
//! into gRPC calls to an HTTP/2 upstream and their answers turned back.
//!
//! The request keeps its length-prefixed messages (decoded from base64 for `-text`) and is
//! sent as `application/grpc`; the response's messages pass as they come and its trailers
//! become a last frame in the body (flag byte 0x80, a 4-byte big-endian length, then
//! `name: value\r\n` lines). A trailers-only answer (the status in the head) gets the same
//! frame, so a client always finds the status in the body. For `-text` the output is base64
//! in whole 3-byte groups as it streams (the remainder waits for the next bytes), padded
//! only at the end: one valid base64 text, which the spec's clients also accept.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

/// How a gRPC-Web call is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Web {
    /// `application/grpc-web-text`: both bodies in base64.
    pub text: bool,
    /// `+proto` was named.
    pub proto: bool,
}

impl Web {
    pub fn of(headers: &HeaderMap) -> Option<Web> {
        let ct = headers.get(header::CONTENT_TYPE)?.as_bytes();
        let ct = ct.split(|&b| b == b';').next().unwrap_or(ct).trim_ascii();
        let rest = ct.strip_prefix(b"application/grpc-web")?;
        let (text, rest) = match rest.strip_prefix(b"-text") {
            Some(r) => (true, r),
            None => (false, rest),
        };
        match rest {
            b"" => Some(Web { text, proto: false }),
            b"+proto" => Some(Web { text, proto: true }),
            _ => None,
        }
    }

    /// The request as a gRPC upstream wants it.
    pub fn to_grpc_request(&self, headers: &mut HeaderMap) {
        let ct = if self.proto {
            "application/grpc+proto"
        } else {
            "application/grpc"
        };
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        if self.text {
            headers.remove(header::CONTENT_LENGTH);
        }
        headers.remove("x-grpc-web");
        headers.remove("x-user-agent");
    }

    fn content_type(&self) -> HeaderValue {
        HeaderValue::from_static(match (self.text, self.proto) {
            (false, false) => "application/grpc-web",
            (false, true) => "application/grpc-web+proto",
            (true, false) => "application/grpc-web-text",
            (true, true) => "application/grpc-web-text+proto",
        })
    }

    /// The response head for the client; returns the body wrapper state, which holds the
    /// status of a trailers-only answer for the trailer frame.
    pub fn respond_head(&self, headers: &mut HeaderMap) -> WebState {
        headers.insert(header::CONTENT_TYPE, self.content_type());
        headers.remove(header::CONTENT_LENGTH);
        let mut early = HeaderMap::new();
        for name in [crate::grpc::GRPC_STATUS, crate::grpc::GRPC_MESSAGE] {
            if let Some(v) = headers.remove(&name) {
                early.insert(name, v);
            }
        }
        WebState {
            text: self.text,
            early: (!early.is_empty()).then_some(early),
            carry: Vec::new(),
            done: false,
        }
    }
}

/// Decode a `-text` request body (concatenated base64 segments, each possibly padded).
pub fn decode_text(body: &[u8]) -> Result<Bytes, String> {
    let clean: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(clean.len() / 4 * 3);
    let mut rest = &clean[..];
    while !rest.is_empty() {
        // A segment ends after its padding, or at the end.
        let end = match rest.iter().position(|&b| b == b'=') {
            Some(i) => {
                let mut j = i;
                while j < rest.len() && rest[j] == b'=' {
                    j += 1;
                }
                j
            }
            None => rest.len(),
        };
        STANDARD
            .decode_vec(&rest[..end], &mut out)
            .map_err(|e| format!("the grpc-web-text body is not base64: {e}"))?;
        rest = &rest[end..];
    }
    Ok(Bytes::from(out))
}

/// The trailer frame for `trailers`.
pub fn trailer_frame(trailers: &HeaderMap) -> Bytes {
    let mut lines = Vec::new();
    for (name, value) in trailers {
        lines.extend_from_slice(name.as_str().as_bytes());
        lines.extend_from_slice(b": ");
        lines.extend_from_slice(value.as_bytes());
        lines.extend_from_slice(b"\r\n");
    }
    let mut frame = BytesMut::with_capacity(5 + lines.len());
    frame.put_u8(0x80);
    frame.put_u32(lines.len() as u32);
    frame.extend_from_slice(&lines);
    frame.freeze()
}

/// What the response body wrapper keeps between frames.
pub struct WebState {
    text: bool,
    /// The status of a trailers-only answer, for the trailer frame.
    early: Option<HeaderMap>,
    /// `-text`: bytes that did not fill a 3-byte group yet.
    carry: Vec<u8>,
    done: bool,
}

impl WebState {
    fn out(&mut self, data: &[u8], last: bool) -> Bytes {
        if !self.text {
            return Bytes::copy_from_slice(data);
        }
        self.carry.extend_from_slice(data);
        let whole = if last {
            self.carry.len()
        } else {
            self.carry.len() / 3 * 3
        };
        let encoded = STANDARD.encode(&self.carry[..whole]);
        self.carry.drain(..whole);
        Bytes::from(encoded)
    }

    fn trailers(&mut self, upstream: Option<HeaderMap>) -> Bytes {
        let mut all = self.early.take().unwrap_or_default();
        if let Some(t) = upstream {
            for (name, value) in t.iter() {
                all.append(name.clone(), value.clone());
            }
        }
        let frame = trailer_frame(&all);
        self.out(&frame, true)
    }
}

/// A response body as gRPC-Web: messages as they come, then the trailer frame.
pub struct WebBody<B> {
    pub inner: B,
    pub state: WebState,
}

impl<B> Body for WebBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        loop {
            if this.state.done {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        // Plain grpc-web passes the bytes as they are.
                        if !this.state.text {
                            if data.is_empty() {
                                continue;
                            }
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        let out = this.state.out(&data, false);
                        if out.is_empty() {
                            continue;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                    Err(frame) => {
                        let trailers = frame.into_trailers().ok();
                        this.state.done = true;
                        let out = this.state.trailers(trailers);
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    this.state.done = true;
                    if this.state.early.is_none() && this.state.carry.is_empty() {
                        return Poll::Ready(None);
                    }
                    let out = if this.state.early.is_some() {
                        this.state.trailers(None)
                    } else {
                        this.state.out(&[], true)
                    };
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn content_types() {
        let of = |ct: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            Web::of(&h)
        };
        assert_eq!(
            of("application/grpc-web"),
            Some(Web {
                text: false,
                proto: false
            })
        );
        assert_eq!(
            of("application/grpc-web-text+proto"),
            Some(Web {
                text: true,
                proto: true
            })
        );
        assert_eq!(of("application/grpc"), None);
        assert_eq!(of("application/grpc-web+json"), None);
    }

    #[test]
    fn text_bodies_decode_as_padded_segments() {
        assert_eq!(&decode_text(b"AAAAAAE=").unwrap()[..], b"\0\0\0\0\x01");
        assert_eq!(&decode_text(b"YQ==Yg==").unwrap()[..], b"ab");
        assert!(decode_text(b"!!").is_err());
    }

    #[test]
    fn the_trailer_frame_is_laid_out_per_the_spec() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        t.insert("x-note", HeaderValue::from_static("hi"));
        let f = trailer_frame(&t);
        let lines = b"grpc-status: 0\r\nx-note: hi\r\n";
        assert_eq!(f[0], 0x80);
        assert_eq!(&f[1..5], &(lines.len() as u32).to_be_bytes());
        assert_eq!(&f[5..], lines);
    }

    /// Frames from a list, as an upstream body would give them.
    struct Frames(std::collections::VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(Ok))
        }
    }

    async fn through(web: Web, frames: Vec<Frame<Bytes>>, head: &mut HeaderMap) -> Bytes {
        let body = WebBody {
            inner: Frames(frames.into()),
            state: web.respond_head(head),
        };
        body.collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn text_output_is_one_base64_text_across_frames() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frames = vec![
            Frame::data(Bytes::from_static(b"\0\0\0\0\x02")),
            Frame::data(Bytes::from_static(b"hi")),
            Frame::trailers(trailers.clone()),
        ];
        let mut head = HeaderMap::new();
        let out = through(
            Web {
                text: true,
                proto: false,
            },
            frames,
            &mut head,
        )
        .await;
        let mut plain = b"\0\0\0\0\x02hi".to_vec();
        plain.extend_from_slice(&trailer_frame(&trailers));
        assert_eq!(out, STANDARD.encode(&plain));
        assert_eq!(head[header::CONTENT_TYPE], "application/grpc-web-text");
    }

    #[tokio::test]
    async fn a_trailers_only_answer_gets_its_status_in_a_trailer_frame() {
        let mut head = HeaderMap::new();
        head.insert("grpc-status", HeaderValue::from_static("16"));
        head.insert("grpc-message", HeaderValue::from_static("no key"));
        let out = through(
            Web {
                text: false,
                proto: true,
            },
            vec![],
            &mut head,
        )
        .await;
        assert!(!head.contains_key("grpc-status"));
        let lines = b"grpc-status: 16\r\ngrpc-message: no key\r\n";
        assert_eq!(&out[5..], lines);
        assert_eq!(head[header::CONTENT_TYPE], "application/grpc-web+proto");
    }
}
