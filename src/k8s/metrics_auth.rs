//! `--metrics-endpoint-auth`: `/metrics` only for callers the cluster authorizes, as the Go EPP
//! does (controller-runtime's authentication and authorization filter).
//!
//! A request must carry `Authorization: Bearer <token>`. The token goes to a `TokenReview`; an
//! authenticated user goes to a `SubjectAccessReview` for verb `get` on the non-resource URL
//! `/metrics`. Answers: 401 without a token or when it does not authenticate, 403 when the user
//! may not `get /metrics`, 500 when the API server cannot be asked (nothing is served on doubt).
//!
//! Verdicts on tokens that authenticate are cached for [`CACHE_TTL`] so that a scrape every few
//! seconds costs two API calls per TTL, not per scrape. Bounded: at most [`CACHE_ENTRIES`]
//! tokens are remembered (the header is client input); when full, expired entries go, and a
//! verdict that still does not fit is not cached. Tokens that do not authenticate and API errors
//! are never cached, and at most [`CONCURRENT_REVIEWS`] reviews run at a time.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, api::PostParams};
use parking_lot::Mutex;

/// How long a verdict on a token is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(10);
/// Tokens remembered at most.
pub const CACHE_ENTRIES: usize = 1_024;

/// What the reviews said about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Authenticated and allowed to `get /metrics`.
    Allowed,
    /// No bearer token, or one that does not authenticate: 401.
    Unauthenticated,
    /// Authenticated, but not allowed: 403.
    Forbidden,
}

impl Verdict {
    /// The HTTP status of a refusal (`None` when allowed).
    pub fn refusal_status(self) -> Option<u16> {
        match self {
            Verdict::Allowed => None,
            Verdict::Unauthenticated => Some(401),
            Verdict::Forbidden => Some(403),
        }
    }
}

/// Reviews `/metrics` requests against the Kubernetes API.
pub struct MetricsAuth {
    client: kube::Client,
    cache: Mutex<HashMap<String, (Verdict, Instant)>>,
    reviews: tokio::sync::Semaphore,
}

/// Reviews in flight at most.
pub const CONCURRENT_REVIEWS: usize = 4;

impl MetricsAuth {
    /// An authorizer asking the API server behind `client`.
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            cache: Mutex::default(),
            reviews: tokio::sync::Semaphore::new(CONCURRENT_REVIEWS),
        }
    }

    /// The verdict on a request whose `Authorization` header is `authorization`.
    ///
    /// # Errors
    /// The API server could not be asked (the caller answers 500).
    pub async fn check(&self, authorization: Option<&str>) -> Result<Verdict, kube::Error> {
        // The scheme is case-insensitive (RFC 7235).
        let Some(token) = authorization
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|t| !t.is_empty())
        else {
            return Ok(Verdict::Unauthenticated);
        };
        let now = Instant::now();
        if let Some((verdict, at)) = self.cache.lock().get(token)
            && now.duration_since(*at) < CACHE_TTL
        {
            return Ok(*verdict);
        }
        let verdict = {
            // Unknown tokens each cost two API calls: at most a few are reviewed at a time.
            let _permit = self.reviews.acquire().await;
            self.review(token).await?
        };
        // Only tokens that authenticate are remembered: junk cannot push the scraper's verdict
        // out of the cache.
        if verdict == Verdict::Unauthenticated {
            return Ok(verdict);
        }
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (_, at)| now.duration_since(*at) < CACHE_TTL);
        }
        if cache.len() < CACHE_ENTRIES {
            cache.insert(token.to_owned(), (verdict, now));
        }
        Ok(verdict)
    }

    async fn review(&self, token: &str) -> Result<Verdict, kube::Error> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                ..TokenReviewSpec::default()
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let Some(status) = reviewed.status.filter(|s| s.authenticated == Some(true)) else {
            return Ok(Verdict::Unauthenticated);
        };
        let user = status.user.unwrap_or_default();
        let access = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some("/metrics".into()),
                    verb: Some("get".into()),
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let decided = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &access)
            .await?;
        Ok(if decided.status.is_some_and(|s| s.allowed) {
            Verdict::Allowed
        } else {
            Verdict::Forbidden
        })
    }
}
