//! A Kubernetes API server on 127.0.0.1 that speaks the real JSON for the few resources the EPP
//! uses: lists with resourceVersion, label and field selectors, watch streams (newline-delimited
//! events, bookmarks, `410 Gone` after a compaction), get/create/replace with optimistic
//! concurrency (409 on a stale resourceVersion).

#![allow(dead_code, clippy::unwrap_used, clippy::collapsible_if)]

use std::{collections::BTreeMap, convert::Infallible, net::SocketAddr, sync::Arc};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{Method, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::{Mutex, broadcast, watch};

#[derive(Clone)]
struct Event {
    collection: String,
    kind: &'static str,
    object: Value,
    /// The object before this event (None when it did not exist).
    prev: Option<Value>,
    rv: u64,
}

struct Inner {
    rv: u64,
    objects: BTreeMap<(String, String), Value>,
    history: Vec<Event>,
    gone_before: u64,
}

/// What the fake answers to TokenReviews and SubjectAccessReviews.
#[derive(Default)]
struct Reviews {
    /// Token → username of the tokens that authenticate.
    tokens: BTreeMap<String, String>,
    /// Users allowed to `get` the non-resource URL `/metrics`.
    metrics_readers: std::collections::BTreeSet<String>,
    /// Answer every review with a 500.
    down: bool,
    /// Reviews asked for (both kinds).
    calls: u32,
}

/// The fake API server.
#[derive(Clone)]
pub struct FakeKube {
    inner: Arc<Mutex<Inner>>,
    reviews: Arc<Mutex<Reviews>>,
    /// Answer every Lease request with a 500 (an API server that cannot reach etcd).
    leases_down: Arc<std::sync::atomic::AtomicBool>,
    events: broadcast::Sender<Event>,
    epoch: watch::Sender<u64>,
    pub addr: SocketAddr,
}

pub const PODS: &str = "/api/v1/namespaces/ns/pods";
pub const POOLS: &str = "/apis/inference.networking.k8s.io/v1/namespaces/ns/inferencepools";
pub const OBJECTIVES: &str = "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/ns/inferenceobjectives";
pub const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ns/leases";

fn list_kind(collection: &str) -> (&'static str, &'static str) {
    match collection {
        PODS => ("PodList", "v1"),
        POOLS => ("InferencePoolList", "inference.networking.k8s.io/v1"),
        OBJECTIVES => ("InferenceObjectiveList", "inference.networking.x-k8s.io/v1alpha2"),
        _ => ("LeaseList", "coordination.k8s.io/v1"),
    }
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code});
    (
        StatusCode::from_u16(code).unwrap(),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn query(req: &Request) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn matches(obj: &Value, q: &BTreeMap<String, String>) -> bool {
    if let Some(sel) = q.get("labelSelector").filter(|s| !s.is_empty()) {
        for kv in sel.split(',') {
            let Some((k, v)) = kv.split_once('=') else {
                return false;
            };
            if obj["metadata"]["labels"][k].as_str() != Some(v) {
                return false;
            }
        }
    }
    if let Some(sel) = q.get("fieldSelector").filter(|s| !s.is_empty()) {
        for kv in sel.split(',') {
            if let Some(("metadata.name", v)) = kv.split_once('=') {
                if obj["metadata"]["name"].as_str() != Some(v) {
                    return false;
                }
            }
        }
    }
    true
}

impl FakeKube {
    pub async fn start() -> FakeKube {
        let (events, _) = broadcast::channel(1024);
        let (epoch, _) = watch::channel(0);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = FakeKube {
            inner: Arc::new(Mutex::new(Inner {
                rv: 100,
                objects: BTreeMap::new(),
                history: Vec::new(),
                gone_before: 0,
            })),
            reviews: Arc::default(),
            leases_down: Arc::default(),
            events,
            epoch,
            addr,
        };
        let app = Router::new().fallback(handle).with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        fake
    }

    /// `token` authenticates as `user`.
    pub async fn add_token(&self, token: &str, user: &str) {
        self.reviews.lock().await.tokens.insert(token.into(), user.into());
    }

    /// `user` may `get /metrics`.
    pub async fn allow_metrics(&self, user: &str) {
        self.reviews.lock().await.metrics_readers.insert(user.into());
    }

    /// Make every review fail with a 500 (`true`) or answer again.
    pub async fn set_reviews_down(&self, down: bool) {
        self.reviews.lock().await.down = down;
    }

    /// Make every Lease request fail with a 500 (`true`) or answer again.
    pub fn set_leases_down(&self, down: bool) {
        self.leases_down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    /// Reviews asked for so far.
    pub async fn review_calls(&self) -> u32 {
        self.reviews.lock().await.calls
    }

    /// A TokenReview or SubjectAccessReview answered as the API server does.
    async fn review(&self, path: &str, body: &[u8]) -> Response {
        let mut r = self.reviews.lock().await;
        r.calls += 1;
        if r.down {
            return status(500, "InternalError", "etcd unavailable");
        }
        let mut review: Value = serde_json::from_slice(body).unwrap();
        if path.ends_with("/tokenreviews") {
            let token = review["spec"]["token"].as_str().unwrap_or_default();
            review["status"] = match r.tokens.get(token) {
                Some(user) => json!({
                    "authenticated": true,
                    "user": {"username": user, "uid": "u-1", "groups": ["system:authenticated"]},
                    "audiences": ["https://kubernetes.default.svc"],
                }),
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
            };
        } else {
            let spec = &review["spec"];
            let asks_metrics = spec["nonResourceAttributes"] == json!({"path": "/metrics", "verb": "get"});
            let user = spec["user"].as_str().unwrap_or_default();
            let allowed = asks_metrics && r.metrics_readers.contains(user);
            review["status"] = if allowed {
                json!({"allowed": true, "reason": "RBAC: allowed by ClusterRoleBinding \"metrics-reader\""})
            } else {
                json!({"allowed": false})
            };
        }
        review["metadata"] = json!({"creationTimestamp": null});
        (
            StatusCode::CREATED,
            [("content-type", "application/json")],
            review.to_string(),
        )
            .into_response()
    }

    pub fn client(&self) -> kube::Client {
        let mut config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        config.default_namespace = "ns".into();
        kube::Client::try_from(config).unwrap()
    }

    async fn record(
        &self,
        inner: &mut Inner,
        collection: &str,
        kind: &'static str,
        mut object: Value,
    ) -> Value {
        inner.rv += 1;
        object["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let prev = inner.objects.get(&(collection.to_owned(), name.clone())).cloned();
        if kind == "DELETED" {
            inner.objects.remove(&(collection.to_owned(), name));
        } else {
            inner
                .objects
                .insert((collection.to_owned(), name), object.clone());
        }
        let ev = Event {
            collection: collection.to_owned(),
            kind,
            object: object.clone(),
            prev,
            rv: inner.rv,
        };
        inner.history.push(ev.clone());
        let _ = self.events.send(ev);
        object
    }

    /// Create or replace an object (test side, no concurrency check).
    pub async fn apply(&self, collection: &str, object: Value) {
        let mut inner = self.inner.lock().await;
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        let kind = if inner.objects.contains_key(&(collection.to_owned(), name)) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.record(&mut inner, collection, kind, object).await;
    }

    /// Delete an object (test side).
    pub async fn delete(&self, collection: &str, name: &str) {
        let mut inner = self.inner.lock().await;
        if let Some(obj) = inner
            .objects
            .get(&(collection.to_owned(), name.to_owned()))
            .cloned()
        {
            self.record(&mut inner, collection, "DELETED", obj).await;
        }
    }

    /// Forget history (watches from older versions get 410) and drop every open watch.
    pub async fn compact(&self) {
        let mut inner = self.inner.lock().await;
        inner.gone_before = inner.rv + 1;
        inner.history.clear();
        self.epoch.send_modify(|e| *e += 1);
    }

    pub async fn get(&self, collection: &str, name: &str) -> Option<Value> {
        self.inner
            .lock()
            .await
            .objects
            .get(&(collection.to_owned(), name.to_owned()))
            .cloned()
    }
}

pub const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
pub const ACCESS_REVIEWS: &str = "/apis/authorization.k8s.io/v1/subjectaccessreviews";

async fn handle(State(fake): State<FakeKube>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    if req.method() == Method::POST && (path == TOKEN_REVIEWS || path == ACCESS_REVIEWS) {
        let body = axum::body::to_bytes(req.into_body(), 1 << 20)
            .await
            .unwrap_or_default();
        return fake.review(&path, &body).await;
    }
    let q = query(&req);
    let (collection, name) = match [PODS, POOLS, OBJECTIVES, LEASES]
        .iter()
        .find(|c| path.starts_with(**c))
    {
        Some(c) => {
            let rest = path[c.len()..].trim_start_matches('/');
            (c.to_string(), (!rest.is_empty()).then(|| rest.to_owned()))
        }
        None => return status(404, "NotFound", &format!("unknown path {path}")),
    };
    if collection == LEASES && fake.leases_down.load(std::sync::atomic::Ordering::SeqCst) {
        return status(500, "InternalError", "etcd unavailable");
    }
    let method = req.method().clone();
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    match (method, name) {
        (Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch_stream(fake, collection, q).await
        }
        (Method::GET, None) => {
            let inner = fake.inner.lock().await;
            let items: Vec<Value> = inner
                .objects
                .iter()
                .filter(|((c, _), o)| *c == collection && matches(o, &q))
                .map(|(_, o)| o.clone())
                .collect();
            let (kind, api_version) = list_kind(&collection);
            let body = json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items});
            ([("content-type", "application/json")], body.to_string()).into_response()
        }
        (Method::GET, Some(name)) => match fake.get(&collection, &name).await {
            Some(o) => ([("content-type", "application/json")], o.to_string()).into_response(),
            None => status(404, "NotFound", &format!("{name} not found")),
        },
        (Method::POST, None) => {
            let obj: Value = serde_json::from_slice(&body).unwrap();
            let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            let mut inner = fake.inner.lock().await;
            if inner.objects.contains_key(&(collection.clone(), name.clone())) {
                return status(409, "AlreadyExists", &format!("{name} already exists"));
            }
            let created = fake.record(&mut inner, &collection, "ADDED", obj).await;
            (
                StatusCode::CREATED,
                [("content-type", "application/json")],
                created.to_string(),
            )
                .into_response()
        }
        (Method::PUT, Some(name)) => {
            let obj: Value = serde_json::from_slice(&body).unwrap();
            let mut inner = fake.inner.lock().await;
            let current = inner.objects.get(&(collection.clone(), name.clone())).cloned();
            let Some(current) = current else {
                return status(404, "NotFound", &format!("{name} not found"));
            };
            if obj["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return status(409, "Conflict", "the object has been modified");
            }
            let replaced = fake.record(&mut inner, &collection, "MODIFIED", obj).await;
            ([("content-type", "application/json")], replaced.to_string()).into_response()
        }
        _ => status(405, "MethodNotAllowed", "not supported by the fake"),
    }
}

async fn watch_stream(fake: FakeKube, collection: String, q: BTreeMap<String, String>) -> Response {
    let since: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut live = fake.events.subscribe();
    let mut epoch = fake.epoch.subscribe();
    let (replay, gone, rv, mut visible) = {
        let inner = fake.inner.lock().await;
        let replay: Vec<Event> = inner
            .history
            .iter()
            .filter(|e| e.rv > since && e.collection == collection)
            .cloned()
            .collect();
        // What the watcher saw at `since`: for objects the replay touches, whether their state
        // before the first replayed event matched; for the others, whether they match now.
        let mut visible: std::collections::BTreeSet<String> = inner
            .objects
            .iter()
            .filter(|((c, _), o)| *c == collection && matches(o, &q))
            .map(|((_, n), _)| n.clone())
            .collect();
        let mut seen = std::collections::BTreeSet::new();
        for e in &replay {
            let name = e.object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if seen.insert(name.clone()) {
                if e.prev.as_ref().is_some_and(|p| matches(p, &q)) {
                    visible.insert(name);
                } else {
                    visible.remove(&name);
                }
            }
        }
        (replay, since != 0 && since < inner.gone_before, inner.rv, visible)
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(async move {
        let line =
            |kind: &str, obj: &Value| Bytes::from(format!("{}\n", json!({"type": kind, "object": obj})));
        if gone {
            let st = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410});
            let _ = tx.send(Ok(line("ERROR", &st))).await;
            return;
        }
        if q.get("allowWatchBookmarks").is_some_and(|v| v == "true") {
            let (_, api_version) = list_kind(&collection);
            let bm = json!({"kind": "Bookmark", "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}});
            if tx.send(Ok(line("BOOKMARK", &bm))).await.is_err() {
                return;
            }
        }
        // With selectors, an object that starts matching is ADDED and one that stops matching is
        // DELETED, as the real API server reports it.
        let mut translate = |e: &Event| -> Option<&'static str> {
            let name = e.object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let now = e.kind != "DELETED" && matches(&e.object, &q);
            let before = visible.contains(&name);
            match (before, now) {
                (false, true) => {
                    visible.insert(name);
                    Some("ADDED")
                }
                (true, true) => Some("MODIFIED"),
                (true, false) => {
                    visible.remove(&name);
                    Some("DELETED")
                }
                (false, false) => None,
            }
        };
        for e in replay {
            if let Some(kind) = translate(&e) {
                if tx.send(Ok(line(kind, &e.object))).await.is_err() {
                    return;
                }
            }
        }
        loop {
            tokio::select! {
                ev = live.recv() => match ev {
                    Ok(e) if e.collection == collection && e.rv > rv => {
                        if let Some(kind) = translate(&e) {
                            if tx.send(Ok(line(kind, &e.object))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
                _ = epoch.changed() => return,
            }
        }
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .unwrap()
}

pub fn pod(name: &str, ip: &str, ready: bool, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "ns", "labels": labels},
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
        "status": {"podIP": ip, "phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    })
}

pub fn pool(name: &str, labels: Value, ports: &[u16]) -> Value {
    json!({
        "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {"selector": {"matchLabels": labels}, "targetPorts": ports.iter().map(|p| json!({"number": p})).collect::<Vec<_>>(),
                 "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}}
    })
}
