//! What the gateway tells the EPP besides the body: request headers read into the decision's
//! [`RequestMeta`], and the `envoy.lb` metadata (the subset hint on the request, the served
//! endpoint on the response).
//!
//! Only headers the exchange reads are kept; an empty tenant, rewrite or objective header counts
//! as absent, as upstream reads them.

use std::collections::HashMap;

use envoy_types::pb::{
    envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata},
    google::protobuf::{Struct, value::Kind},
};

use super::wire::{
    DEBUG_REQUEST, FAIRNESS_HEADERS, LB_NAMESPACE, MODEL_REWRITE_HEADERS, OBJECTIVE_HEADERS, REQUEST_ID,
    SERVED_ENDPOINT_KEY, SUBSET_HINT_KEY, SUBSET_HINT_NAMESPACE, TEST_ENDPOINT_SELECTION,
};
use crate::scheduler::{
    RequestMeta,
    admission::{SPIFFE_ATTRIBUTE, TenantSource},
};

/// The request headers an exchange keeps.
#[derive(Debug, Default)]
pub struct RequestHeaders {
    /// `:path`.
    pub path: Option<String>,
    /// `x-original-path` or `x-forwarded-path`, used when `:path` is missing.
    pub fallback_path: Option<String>,
    /// `x-request-id`.
    pub request_id: Option<String>,
    /// What the decision reads.
    pub meta: RequestMeta,
}

impl RequestHeaders {
    /// Read `headers`. `tenant_header` is the budget's tenant header (lower case), if any;
    /// `explain_allowed` is `--explain-decisions`, `conformance` `--conformance-hooks`.
    pub fn read(
        &mut self,
        headers: Option<&HeaderMap>,
        tenant_header: Option<&str>,
        explain_allowed: bool,
        conformance: bool,
    ) {
        for hv in headers.map(|m| m.headers.as_slice()).unwrap_or_default() {
            let key = hv.key.to_ascii_lowercase();
            let value = header_value(hv);
            match key.as_str() {
                ":path" => self.path = Some(text(value)),
                "x-original-path" | "x-forwarded-path" if self.fallback_path.is_none() => {
                    self.fallback_path = Some(text(value));
                }
                REQUEST_ID => self.request_id = Some(text(value)),
                DEBUG_REQUEST => self.meta.explain = explain_allowed,
                TEST_ENDPOINT_SELECTION if conformance && !value.is_empty() => {
                    self.meta.endpoint_selection = Some(text(value).split(',').map(str::to_owned).collect());
                }
                k if tenant_header == Some(k) && !value.is_empty() => self.meta.tenant = Some(text(value)),
                k if MODEL_REWRITE_HEADERS.contains(&k) && !value.is_empty() => {
                    self.meta.model_rewrite = Some(text(value));
                }
                k if OBJECTIVE_HEADERS.contains(&k) && !value.is_empty() => {
                    self.meta.objective = Some(text(value));
                }
                k if FAIRNESS_HEADERS.contains(&k)
                    && !value.is_empty()
                    && self.meta.fairness_id.is_none() =>
                {
                    self.meta.fairness_id = Some(text(value));
                }
                _ => {}
            }
        }
    }

    /// Read the tenant from the caller's SPIFFE identity, the request attribute
    /// [`SPIFFE_ATTRIBUTE`] Envoy sends with the request headers when the ext_proc filter
    /// lists it in `request_attributes` (the attributes arrive keyed by the filter's name; any
    /// key is read). Without a workload id of the Kubernetes shape the tenant stays unset.
    pub fn read_spiffe_tenant(&mut self, attributes: &HashMap<String, Struct>, source: &TenantSource) {
        let uri = attributes
            .values()
            .filter_map(|s| s.fields.get(SPIFFE_ATTRIBUTE))
            .find_map(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.as_str()),
                _ => None,
            });
        self.meta.tenant = uri.and_then(|u| source.from_spiffe(u));
    }

    /// The path the body is parsed for: `:path`, else a forwarded path, else completions.
    pub fn api_path(&self) -> &str {
        self.path
            .as_deref()
            .or(self.fallback_path.as_deref())
            .unwrap_or("/v1/completions")
    }
}

/// A header's value: `raw_value` when Envoy sent one (it does for non-UTF-8 values), else
/// `value`.
pub fn header_value(h: &HeaderValue) -> &[u8] {
    if h.raw_value.is_empty() {
        h.value.as_bytes()
    } else {
        &h.raw_value
    }
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

/// The subset hint in `md`, if the namespace and key are present. A list is read as strings
/// (other kinds skipped); a comma-separated string is accepted too.
pub fn subset_hint(md: &Metadata) -> Option<Vec<String>> {
    let value = md
        .filter_metadata
        .get(SUBSET_HINT_NAMESPACE)?
        .fields
        .get(SUBSET_HINT_KEY)?;
    match value.kind.as_ref()? {
        Kind::ListValue(list) => Some(
            list.values
                .iter()
                .filter_map(|v| match &v.kind {
                    Some(Kind::StringValue(s)) => Some(s.trim().to_owned()),
                    _ => None,
                })
                .collect(),
        ),
        Kind::StringValue(s) => Some(
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        ),
        _ => None,
    }
}

/// What `--conformance-hooks` echoes in `x-conformance-test-served-endpoint`: the served
/// endpoint, or the upstream test EPP's failure texts when the gateway sent no such metadata.
pub fn conformance_served(md: Option<&Metadata>) -> String {
    match md.and_then(|m| m.filter_metadata.get(LB_NAMESPACE)) {
        None => "fail: missing envoy lb metadata".into(),
        Some(_) => md
            .and_then(served_endpoint)
            .unwrap_or_else(|| "fail: missing destination endpoint served metadata".into()),
    }
}

/// The endpoint the proxy reports it served from (`envoy.lb` metadata on response headers).
pub fn served_endpoint(md: &Metadata) -> Option<String> {
    match md
        .filter_metadata
        .get(LB_NAMESPACE)?
        .fields
        .get(SERVED_ENDPOINT_KEY)?
        .kind
        .as_ref()?
    {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// Whether response headers announce an SSE stream.
pub fn is_event_stream(headers: Option<&HeaderMap>) -> bool {
    headers
        .map(|m| m.headers.as_slice())
        .unwrap_or_default()
        .iter()
        .any(|hv| {
            hv.key.eq_ignore_ascii_case("content-type")
                && text(header_value(hv))
                    .to_ascii_lowercase()
                    .contains("text/event-stream")
        })
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::google::protobuf::{Struct, Value};

    use super::*;

    fn metadata(namespace: &str, fields: &[(&str, &str)]) -> Metadata {
        let fields = fields
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    Value {
                        kind: Some(Kind::StringValue((*v).to_owned())),
                    },
                )
            })
            .collect();
        Metadata {
            filter_metadata: [(namespace.to_owned(), Struct { fields })].into(),
            ..Default::default()
        }
    }

    /// The conformance echo: the served endpoint, or the test EPP's exact failure texts.
    #[test]
    fn conformance_served_names_the_endpoint_or_what_is_missing() {
        assert_eq!(conformance_served(None), "fail: missing envoy lb metadata");
        let other = metadata(
            "envoy.other",
            &[("x-gateway-destination-endpoint-served", "10.0.0.1:8000")],
        );
        assert_eq!(
            conformance_served(Some(&other)),
            "fail: missing envoy lb metadata"
        );
        let no_key = metadata("envoy.lb", &[("x-gateway-destination-endpoint", "10.0.0.1:8000")]);
        assert_eq!(
            conformance_served(Some(&no_key)),
            "fail: missing destination endpoint served metadata"
        );
        let served = metadata(
            "envoy.lb",
            &[("x-gateway-destination-endpoint-served", "10.0.0.1:8000")],
        );
        assert_eq!(conformance_served(Some(&served)), "10.0.0.1:8000");
    }

    #[test]
    fn the_selection_header_is_read_only_with_the_hooks() {
        let headers = HeaderMap {
            headers: vec![HeaderValue {
                key: "test-epp-endpoint-selection".into(),
                value: "10.0.0.1,10.0.0.2:8000".into(),
                raw_value: Vec::new(),
            }],
        };
        let mut off = RequestHeaders::default();
        off.read(Some(&headers), None, false, false);
        assert_eq!(off.meta.endpoint_selection, None);
        let mut on = RequestHeaders::default();
        on.read(Some(&headers), None, false, true);
        assert_eq!(
            on.meta.endpoint_selection,
            Some(vec!["10.0.0.1".to_owned(), "10.0.0.2:8000".to_owned()])
        );
    }
}
