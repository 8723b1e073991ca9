//! Which OpenAI-style API a request targets, from its path.

/// The API of a request, which decides the required fields and where the prompt is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    /// `/v1/completions`: `prompt`.
    Completions,
    /// `/v1/chat/completions`: `messages`.
    ChatCompletions,
    /// `/v1/responses`: `input`.
    Responses,
    /// `/v1/conversations`: `items`.
    Conversations,
    /// `/v1/embeddings`: `input`.
    Embeddings,
    /// A body the configured parser does not read (`passthrough-parser`): no model, no prompt.
    /// Never derived from a path.
    Passthrough,
}

/// `%XX` escapes decoded (a malformed escape is kept as it is; a non-UTF-8 result is lossy).
fn percent_decode(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.contains('%') {
        return std::borrow::Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

impl ApiKind {
    /// Classify a request path by suffix, in the Go EPP's fixed order; anything else is
    /// completions. The query string, a fragment and trailing slashes are not part of the
    /// path the model server routes on, so they are dropped first: `/v1/chat/completions?
    /// api-version=…` (Azure-style SDKs) is chat, as the server behind it reads it. (The Go EPP
    /// compares the raw `:path`, which classifies it as completions: the guard would then scan a
    /// decoy `prompt` while the server reads `messages`.)
    pub fn from_path(path: &str) -> Self {
        let path = path.split(['?', '#']).next().unwrap_or_default();
        // Servers route on the decoded path: `/v1/chat/completion%73` is chat to them.
        let decoded = percent_decode(path);
        let path = decoded.trim_end_matches('/');
        const ORDER: [(&str, ApiKind); 5] = [
            ("/conversations", ApiKind::Conversations),
            ("/responses", ApiKind::Responses),
            ("/chat/completions", ApiKind::ChatCompletions),
            ("/completions", ApiKind::Completions),
            ("/embeddings", ApiKind::Embeddings),
        ];
        ORDER
            .iter()
            .find(|(suffix, _)| path.ends_with(suffix))
            .map(|(_, kind)| *kind)
            .unwrap_or(ApiKind::Completions)
    }

    /// The body field that carries the prompt.
    pub fn prompt_field(self) -> &'static str {
        match self {
            ApiKind::Completions => "prompt",
            ApiKind::ChatCompletions => "messages",
            ApiKind::Responses | ApiKind::Embeddings => "input",
            ApiKind::Conversations => "items",
            ApiKind::Passthrough => "",
        }
    }

    /// The 400 message when the prompt field is missing or empty (upstream wording).
    pub fn missing_prompt_message(self) -> &'static str {
        match self {
            ApiKind::Completions => "invalid completions request: must have prompt field",
            ApiKind::ChatCompletions => "invalid chat completions request: must have valid messages field",
            ApiKind::Responses => "invalid responses request: must have input field",
            ApiKind::Conversations => "invalid conversations request: must have items field",
            ApiKind::Embeddings => "invalid embeddings request: must have input field",
            ApiKind::Passthrough => "request body not read by the passthrough parser",
        }
    }

    /// Label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiKind::Completions => "completions",
            ApiKind::ChatCompletions => "chat_completions",
            ApiKind::Responses => "responses",
            ApiKind::Conversations => "conversations",
            ApiKind::Embeddings => "embeddings",
            ApiKind::Passthrough => "passthrough",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_suffix_rules_match_upstream() {
        assert_eq!(
            ApiKind::from_path("/v1/chat/completions"),
            ApiKind::ChatCompletions
        );
        assert_eq!(ApiKind::from_path("/v1/completions"), ApiKind::Completions);
        assert_eq!(ApiKind::from_path("/v1/responses"), ApiKind::Responses);
        assert_eq!(ApiKind::from_path("/v1/conversations"), ApiKind::Conversations);
        assert_eq!(ApiKind::from_path("/v1/embeddings"), ApiKind::Embeddings);
        assert_eq!(ApiKind::from_path("/anything"), ApiKind::Completions);
    }

    /// Regression (security issue): upstream compares the raw `:path`, so a query string made a
    /// chat request completions; here it is dropped, with a fragment and trailing slashes.
    #[test]
    fn the_query_string_and_trailing_slashes_do_not_change_the_api() {
        for (path, api) in [
            ("/v1/chat/completions?x=y", ApiKind::ChatCompletions),
            (
                "/v1/chat/completions?api-version=2024-10-21",
                ApiKind::ChatCompletions,
            ),
            ("/v1/chat/completions/", ApiKind::ChatCompletions),
            (
                "/v1/chat/completions/?x=/v1/completions",
                ApiKind::ChatCompletions,
            ),
            ("/v1/chat/completions#frag", ApiKind::ChatCompletions),
            ("/v1/chat/completion%73", ApiKind::ChatCompletions),
            ("/v1/chat%2Fcompletions", ApiKind::ChatCompletions),
            ("/v1/chat/completions%2F", ApiKind::ChatCompletions),
            ("/v1/completions%", ApiKind::Completions),
            ("/v1/chat/completions%zz", ApiKind::Completions),
            ("/v1/responses?stream=true", ApiKind::Responses),
            ("/v1/embeddings/", ApiKind::Embeddings),
            ("/v1/completions?x=/chat/completions", ApiKind::Completions),
            ("/v1/models", ApiKind::Completions),
            ("", ApiKind::Completions),
        ] {
            assert_eq!(ApiKind::from_path(path), api, "{path}");
        }
    }
}
