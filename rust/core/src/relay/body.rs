//! A relayed stream as an HTTP response body that says when it has ended.
//!
//! hyper writes a body frame together with the chunked encoding's terminator when the body
//! reports its end (`is_end_stream`) as it hands over that frame; a body that learns its end
//! only on the next poll costs the client's connection one more write (and the client one more
//! read) per stream. So the read that relays `[DONE]` after the worker's body has ended goes
//! out as the last frame, and the stream's events, `[DONE]` and the terminator leave in one
//! write. It does not decide what the client gets: that is `stream`'s.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use http_body::{Frame, SizeHint};

use super::stream::EventStream;

impl EventStream {
    /// The stream as an HTTP body: its bytes, read by read, the last read marked as the end.
    pub fn into_body(self: Box<Self>) -> Body {
        sse(self)
    }
}

/// The HTTP body of `events`: its reads' bytes, the last one marked as the end.
fn sse(events: Box<EventStream>) -> Body {
    let reads = futures_util::stream::unfold(Some(events), |events| async move {
        let mut events = events?;
        loop {
            let relayed = events.next().await?;
            if events.ended() {
                // Nothing is left to read: the stream (and its guards) can go now.
                return Some(((relayed.bytes, true), None));
            }
            if !relayed.bytes.is_empty() {
                return Some(((relayed.bytes, false), Some(events)));
            }
        }
    });
    Body::new(SseBody {
        reads: Box::pin(reads),
        ended: false,
    })
}

/// Each read's bytes as a data frame; `ended` once the last one has gone.
struct SseBody {
    reads: BoxStream<'static, (Bytes, bool)>,
    ended: bool,
}

impl http_body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.reads.as_mut().poll_next(cx) {
            Poll::Ready(Some((bytes, last))) => {
                self.ended = last;
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use http_body_util::BodyExt;

    fn body(reads: Vec<(&'static str, bool)>) -> SseBody {
        let reads = reads
            .into_iter()
            .map(|(text, last)| (Bytes::from(text), last));
        SseBody {
            reads: Box::pin(futures_util::stream::iter(reads)),
            ended: false,
        }
    }

    #[tokio::test]
    async fn the_last_read_is_handed_over_as_the_end_of_the_body() {
        let mut sse = body(vec![("data: a\n\n", false), ("data: [DONE]\n\n", true)]);
        assert!(!sse.is_end_stream());
        let first = sse.frame().await.and_then(|f| f.ok()?.into_data().ok());
        assert_eq!(first.as_deref(), Some(&b"data: a\n\n"[..]));
        assert!(!sse.is_end_stream());
        let last = sse.frame().await.and_then(|f| f.ok()?.into_data().ok());
        assert_eq!(last.as_deref(), Some(&b"data: [DONE]\n\n"[..]));
        // hyper asks right after the frame: the chunked end goes out in the same write.
        assert!(sse.is_end_stream());
        assert!(sse.frame().await.is_none());
    }

    #[tokio::test]
    async fn reads_that_never_say_last_end_when_the_stream_does() {
        let mut sse = body(vec![("data: a\n\n", false)]);
        assert!(sse.frame().await.is_some());
        assert!(!sse.is_end_stream());
        assert!(sse.frame().await.is_none());
        assert!(sse.is_end_stream());
    }
}
