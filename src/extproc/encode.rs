//! Builders for the ext_proc answers the EPP sends.

use envoy_types::pb::{
    envoy::{
        config::core::v3::{HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction},
        service::ext_proc::v3::{
            BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse,
            ProcessingResponse, StreamedBodyResponse, TrailersResponse, body_mutation::Mutation,
            processing_response::Response,
        },
        r#type::v3::HttpStatus,
    },
    google::protobuf::{Struct, Value, value::Kind},
};

use super::wire::{BODY_CHUNK_BYTES, DESTINATION_ENDPOINT, LB_NAMESPACE};

/// One header to set, always with `raw_value` (Envoy 1.40 ignores `value`) and overwrite.
#[allow(
    deprecated,
    reason = "the deprecated `append` field must still be named to be left unset"
)]
pub fn set_header(key: &str, value: &[u8]) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: String::new(),
            raw_value: value.to_vec(),
        }),
        append: None,
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        keep_empty_value: false,
    }
}

/// `{"envoy.lb": {"x-gateway-destination-endpoint": destination}}`.
pub fn destination_metadata(destination: &str) -> Struct {
    let inner = Struct {
        fields: [(
            DESTINATION_ENDPOINT.to_owned(),
            Value {
                kind: Some(Kind::StringValue(destination.to_owned())),
            },
        )]
        .into(),
    };
    Struct {
        fields: [(
            LB_NAMESPACE.to_owned(),
            Value {
                kind: Some(Kind::StructValue(inner)),
            },
        )]
        .into(),
    }
}

/// A common response carrying `headers` (and clearing the route cache when routing changed).
pub fn common_with_headers(headers: Vec<HeaderValueOption>, clear_route_cache: bool) -> CommonResponse {
    CommonResponse {
        header_mutation: (!headers.is_empty()).then(|| HeaderMutation {
            set_headers: headers,
            remove_headers: Vec::new(),
        }),
        clear_route_cache,
        ..Default::default()
    }
}

/// The request-headers answer.
pub fn request_headers_answer(common: CommonResponse, metadata: Option<Struct>) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::RequestHeaders(HeadersResponse {
            response: Some(common),
        })),
        dynamic_metadata: metadata,
        ..Default::default()
    }
}

/// The response-headers answer.
pub fn response_headers_answer(common: CommonResponse) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::ResponseHeaders(HeadersResponse {
            response: Some(common),
        })),
        ..Default::default()
    }
}

/// Which direction a body answer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → model server.
    Request,
    /// Model server → client.
    Response,
}

fn body_answer(direction: Direction, common: CommonResponse) -> ProcessingResponse {
    let body = BodyResponse {
        response: Some(common),
    };
    ProcessingResponse {
        response: Some(match direction {
            Direction::Request => Response::RequestBody(body),
            Direction::Response => Response::ResponseBody(body),
        }),
        ..Default::default()
    }
}

/// One `streamed_response` body answer (full-duplex mode).
pub fn streamed_chunk(direction: Direction, body: &[u8], end_of_stream: bool) -> ProcessingResponse {
    streamed_answer(direction, body.to_vec(), end_of_stream)
}

fn streamed_answer(direction: Direction, body: Vec<u8>, end_of_stream: bool) -> ProcessingResponse {
    body_answer(
        direction,
        CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(Mutation::StreamedResponse(StreamedBodyResponse {
                    body,
                    end_of_stream,
                    ..Default::default()
                })),
            }),
            ..Default::default()
        },
    )
}

/// `body` as `streamed_response` answers of at most [`BODY_CHUNK_BYTES`], `end_of_stream` on the
/// last one only when `end_of_stream`; an empty body is one empty chunk.
pub fn push_streamed_body(
    out: &mut Vec<ProcessingResponse>,
    direction: Direction,
    body: &[u8],
    end_of_stream: bool,
) {
    if body.is_empty() {
        out.push(streamed_chunk(direction, body, end_of_stream));
        return;
    }
    let chunks = body.len().div_ceil(BODY_CHUNK_BYTES);
    for (i, chunk) in body.chunks(BODY_CHUNK_BYTES).enumerate() {
        out.push(streamed_chunk(direction, chunk, end_of_stream && i + 1 == chunks));
    }
}

/// `pieces` as `streamed_response` answers, each piece moved into its own answer (a piece over
/// [`BODY_CHUNK_BYTES`] is split); `end_of_stream` on the last answer only when `end_of_stream`.
/// No pieces, or only empty ones, make one empty chunk.
pub fn push_streamed_pieces(
    out: &mut Vec<ProcessingResponse>,
    direction: Direction,
    mut pieces: Vec<Vec<u8>>,
    end_of_stream: bool,
) {
    pieces.retain(|p| !p.is_empty());
    let Some(last) = pieces.pop() else {
        out.push(streamed_chunk(direction, &[], end_of_stream));
        return;
    };
    for piece in pieces {
        push_piece(out, direction, piece, false);
    }
    push_piece(out, direction, last, end_of_stream);
}

fn push_piece(out: &mut Vec<ProcessingResponse>, direction: Direction, piece: Vec<u8>, end_of_stream: bool) {
    if piece.len() > BODY_CHUNK_BYTES {
        push_streamed_body(out, direction, &piece, end_of_stream);
    } else {
        out.push(streamed_answer(direction, piece, end_of_stream));
    }
}

/// A body answer for buffered or streamed (non-duplex) modes: replace the body when `replacement`
/// is given, and optionally carry header mutations.
pub fn body_replace_answer(
    direction: Direction,
    mut common: CommonResponse,
    replacement: Option<Vec<u8>>,
) -> ProcessingResponse {
    if let Some(body) = replacement {
        common.body_mutation = Some(BodyMutation {
            mutation: Some(Mutation::Body(body)),
        });
    }
    body_answer(direction, common)
}

/// An empty trailers answer for either direction.
pub fn trailers_answer(direction: Direction) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(match direction {
            Direction::Request => Response::RequestTrailers(TrailersResponse::default()),
            Direction::Response => Response::ResponseTrailers(TrailersResponse::default()),
        }),
        ..Default::default()
    }
}

/// An immediate response with a status, headers and body.
pub fn immediate(
    status: u16,
    headers: Vec<HeaderValueOption>,
    body: Vec<u8>,
    details: &str,
) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::ImmediateResponse(ImmediateResponse {
            status: Some(HttpStatus {
                code: i32::from(status),
            }),
            headers: Some(HeaderMutation {
                set_headers: headers,
                remove_headers: Vec::new(),
            }),
            body,
            grpc_status: None,
            details: details.to_owned(),
        })),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(body_len: usize) -> Vec<(usize, bool)> {
        let mut out = Vec::new();
        push_streamed_body(&mut out, Direction::Request, &vec![b'x'; body_len], true);
        chunk_sizes(&out)
    }

    fn chunk_sizes(out: &[ProcessingResponse]) -> Vec<(usize, bool)> {
        out.iter()
            .map(|r| match &r.response {
                Some(Response::RequestBody(b)) => match &b
                    .response
                    .as_ref()
                    .unwrap()
                    .body_mutation
                    .as_ref()
                    .unwrap()
                    .mutation
                {
                    Some(Mutation::StreamedResponse(s)) => (s.body.len(), s.end_of_stream),
                    _ => panic!("not streamed"),
                },
                _ => panic!("not a body answer"),
            })
            .collect()
    }

    #[test]
    fn chunking_vectors_match_upstream() {
        assert_eq!(sizes(0), vec![(0, true)]);
        assert_eq!(sizes(61_000), vec![(61_000, true)]);
        assert_eq!(sizes(62_000), vec![(62_000, true)]);
        assert_eq!(sizes(62_001), vec![(62_000, false), (1, true)]);
        assert_eq!(sizes(63_000).len(), 2);
        assert_eq!(
            sizes(125_000),
            vec![(62_000, false), (62_000, false), (1_000, true)]
        );
    }

    #[test]
    fn pieces_are_sent_as_received_and_oversized_ones_split() {
        let mut out = Vec::new();
        let pieces = vec![vec![b'a'; 10], Vec::new(), vec![b'b'; 70_000], vec![b'c'; 5]];
        push_streamed_pieces(&mut out, Direction::Request, pieces, true);
        assert_eq!(
            chunk_sizes(&out),
            vec![(10, false), (62_000, false), (8_000, false), (5, true)]
        );
        let mut out = Vec::new();
        push_streamed_pieces(&mut out, Direction::Request, vec![vec![b'a'; 3]], false);
        assert_eq!(chunk_sizes(&out), vec![(3, false)]);
        let mut out = Vec::new();
        push_streamed_pieces(&mut out, Direction::Request, vec![Vec::new()], true);
        assert_eq!(chunk_sizes(&out), vec![(0, true)]);
    }
}
