//! The metrics collector against real HTTP servers on 127.0.0.1: published fixture pages, the
//! full vLLM V1 page, and injected faults (timeout, 500, reset, garbage, endless and huge bodies).

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, body::Body, routing::get};
use epp::{
    clock::MonotonicClock,
    datastore::{
        DatastoreEvent, DatastoreWriter, Endpoint, EndpointKey, EndpointSpec, InFlight, SnapshotReader,
    },
    datastore::{EngineMetrics, ScrapeFailure},
    metrics::exported::EppMetrics,
    scrape::{
        collector::{CollectorConfig, MAX_BODY_BYTES, PageSource, run_collector, scrape_once},
        data_layer::{DataLayer, DataSourceParams, ENGINE_LABEL},
        engines::{EngineSpec, builtin_engines},
    },
};
use tokio::{io::AsyncWriteExt, net::TcpListener, sync::mpsc};
use tokio_util::sync::CancellationToken;

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn engine(name: &str) -> EngineSpec {
    builtin_engines().into_iter().find(|e| &*e.name == name).unwrap()
}

async fn serve(router: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

async fn serve_text(text: String) -> SocketAddr {
    serve(Router::new().route("/metrics", get(move || async move { text }))).await
}

async fn scrape(addr: SocketAddr, engine_name: &str) -> Result<EngineMetrics, ScrapeFailure> {
    let client = reqwest::Client::new();
    scrape_once(
        &client,
        &format!("http://{addr}/metrics"),
        &engine(engine_name),
        Duration::from_millis(500),
    )
    .await
}

#[tokio::test]
async fn published_fixture_pages_give_the_expected_values() {
    let v0 = scrape(serve_text(fixture("vllm-v0.prom")).await, "vllm")
        .await
        .unwrap();
    assert_eq!((v0.waiting, v0.running, v0.kv_usage), (0, 0, Some(0.0)));
    assert_eq!((v0.block_size, v0.num_gpu_blocks), (Some(16), Some(81767)));
    let lora = v0.lora.unwrap();
    assert_eq!(
        (lora.running.len(), lora.waiting.len(), lora.max_active),
        (0, 0, 0)
    );

    // The published V1 sample has only the running gauge: KV is unknown, not zero.
    let v1 = scrape(serve_text(fixture("vllm-v1.prom")).await, "vllm")
        .await
        .unwrap();
    assert_eq!(
        (v1.waiting, v1.running, v1.kv_usage, v1.lora.is_none()),
        (0, 8, None, true)
    );

    let sg = scrape(serve_text(fixture("sglang.prom")).await, "sglang")
        .await
        .unwrap();
    assert_eq!((sg.waiting, sg.running, sg.kv_usage), (2826, 162, Some(0.28)));

    let tr = scrape(
        serve_text(fixture("triton-trtllm.prom")).await,
        "triton-tensorrt-llm",
    )
    .await
    .unwrap();
    assert_eq!((tr.waiting, tr.running, tr.kv_usage), (1, 1, Some(0.4875)));
    assert_eq!((tr.block_size, tr.num_gpu_blocks), (Some(64), Some(6239)));
}

/// A page captured from a real `llama-server --metrics -np 2` (llama.cpp) while it processed two
/// requests and deferred a third: no KV gauge, so KV is unknown.
#[tokio::test]
async fn llamacpp_page_gives_busy_slots_deferred_requests_and_unknown_kv() {
    let m = scrape(serve_text(fixture("llamacpp.prom")).await, "llamacpp")
        .await
        .unwrap();
    assert_eq!((m.running, m.waiting, m.kv_usage), (2, 1, None));
    assert_eq!((m.block_size, m.num_gpu_blocks, m.lora), (None, None, None));
    // Read as vLLM (the default engine), the page has none of the required signals.
    let wrong = scrape(serve_text(fixture("llamacpp.prom")).await, "vllm").await;
    assert_eq!(wrong, Err(ScrapeFailure::Parse));
}

#[tokio::test]
async fn full_v1_page_sums_ranks_averages_kv_and_takes_the_newest_lora_series() {
    let m = scrape(serve_text(fixture("vllm-v1-full.prom")).await, "vllm")
        .await
        .unwrap();
    assert_eq!(m.waiting, 7, "3 + 4 across data-parallel ranks");
    assert_eq!(m.running, 16, "10 + 6");
    assert_eq!(m.kv_usage, Some(0.5), "mean of 0.25 and 0.75");
    let lora = m.lora.unwrap();
    assert_eq!(
        lora.running.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        vec!["sql-lora"]
    );
    assert!(lora.waiting.is_empty());
    assert_eq!(lora.max_active, 2);
    assert_eq!((m.block_size, m.num_gpu_blocks), (Some(16), Some(27000)));
}

#[tokio::test]
async fn a_chunked_page_in_small_pieces_gives_the_same_values() {
    let page = fixture("vllm-v1-full.prom");
    let whole = scrape(serve_text(page.clone()).await, "vllm").await.unwrap();
    let chunked = serve(Router::new().route(
        "/metrics",
        get(move || {
            let pieces: Vec<Result<bytes::Bytes, std::io::Error>> = page
                .as_bytes()
                .chunks(997)
                .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
                .collect();
            async move { Body::from_stream(tokio_stream::iter(pieces)) }
        }),
    ))
    .await;
    assert_eq!(scrape(chunked, "vllm").await.unwrap(), whole);
}

/// A raw HTTP/1.1 server answering `page` to every request; counts connections and requests.
/// With `close_after_each`, it closes the connection after each answer without saying so (as
/// a server whose idle timeout fired does).
async fn counting_server(
    page: &'static str,
    close_after_each: bool,
) -> (
    SocketAddr,
    Arc<std::sync::atomic::AtomicUsize>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connections, requests) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (c, r) = (connections.clone(), requests.clone());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                loop {
                    let n = tokio::io::AsyncReadExt::read(&mut sock, &mut buf)
                        .await
                        .unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        got.drain(..end + 4);
                        r.fetch_add(1, Ordering::SeqCst);
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{page}",
                            page.len()
                        );
                        if sock.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                        if close_after_each {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, connections, requests)
}

#[tokio::test]
async fn the_connection_is_kept_between_scrapes_and_reopened_when_the_pod_closed_it() {
    use std::sync::atomic::Ordering;
    const PAGE: &str = "vllm:num_requests_waiting 2\nvllm:num_requests_running 1\n";
    let client = reqwest::Client::new();
    for (close_after_each, want_connections) in [(false, 1), (true, 3)] {
        let (addr, connections, requests) = counting_server(PAGE, close_after_each).await;
        let mut source = PageSource::new(&client, &format!("http://{addr}/metrics")).unwrap();
        assert!(matches!(source, PageSource::Plain(_)));
        for _ in 0..3 {
            let spec = engine("vllm");
            let names = epp::scrape::engines::sample_names(&spec);
            let m = source
                .scrape(&spec, &names, Duration::from_secs(2))
                .await
                .unwrap();
            assert_eq!((m.waiting, m.running), (2, 1));
        }
        assert_eq!(requests.load(Ordering::SeqCst), 3);
        assert_eq!(
            connections.load(Ordering::SeqCst),
            want_connections,
            "close_after_each: {close_after_each}"
        );
    }
}

#[tokio::test]
async fn https_and_host_names_go_through_the_general_client() {
    let client = reqwest::Client::new();
    for url in ["https://10.0.0.1:8000/metrics", "http://pod.example:8000/metrics"] {
        assert!(matches!(
            PageSource::new(&client, url).unwrap(),
            PageSource::Client { .. }
        ));
    }
    assert!(PageSource::new(&client, "not a url").is_err());
}

#[tokio::test]
async fn faults_are_recorded_per_kind() {
    let slow = serve(Router::new().route(
        "/metrics",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            "vllm:num_requests_waiting 1\n"
        }),
    ))
    .await;
    assert_eq!(scrape(slow, "vllm").await, Err(ScrapeFailure::Timeout));

    let status = serve(Router::new().route(
        "/metrics",
        get(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
    ))
    .await;
    assert_eq!(scrape(status, "vllm").await, Err(ScrapeFailure::HttpStatus(500)));

    let garbage = serve_text("\u{0}\u{1}not { prometheus ]] at all\n{{{{\n".into()).await;
    assert_eq!(scrape(garbage, "vllm").await, Err(ScrapeFailure::Parse));

    let wrong_types = serve_text(
        "vllm:num_requests_waiting abc\nvllm:num_requests_running NaN\nvllm:kv_cache_usage_perc +Inf\n"
            .into(),
    )
    .await;
    assert_eq!(
        scrape(wrong_types, "vllm").await,
        Err(ScrapeFailure::Parse),
        "no finite required value"
    );

    let negative = serve_text(
        "vllm:num_requests_waiting -3\nvllm:num_requests_running 2\nvllm:kv_cache_usage_perc 1.7\n".into(),
    )
    .await;
    let m = scrape(negative, "vllm").await.unwrap();
    assert_eq!(
        (m.waiting, m.running, m.kv_usage),
        (0, 2, Some(1.0)),
        "clamped into range"
    );

    // A server that accepts and then resets the connection.
    let reset = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reset_addr = reset.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((sock, _)) = reset.accept().await {
            #[allow(deprecated, reason = "a zero linger is how a test server sends a reset")]
            sock.set_linger(Some(Duration::ZERO)).unwrap();
            drop(sock);
        }
    });
    assert_eq!(scrape(reset_addr, "vllm").await, Err(ScrapeFailure::Connect));

    // Nothing listening.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    assert_eq!(scrape(closed, "vllm").await, Err(ScrapeFailure::Connect));
}

#[tokio::test]
async fn endless_and_huge_bodies_are_cut_without_growing_memory() {
    // An endless body: chunks forever. The cap stops it long before the timeout.
    let endless = serve(Router::new().route(
        "/metrics",
        get(|| async {
            let chunk = bytes::Bytes::from(vec![b'#'; 64 * 1024]);
            let stream = futures_stream(chunk);
            Body::from_stream(stream)
        }),
    ))
    .await;
    let client = reqwest::Client::new();
    let r = scrape_once(
        &client,
        &format!("http://{endless}/metrics"),
        &engine("vllm"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(r, Err(ScrapeFailure::TooLarge));

    // A 100 MB body with a content-length.
    let huge = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let huge_addr = huge.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = huge.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut sock, &mut buf).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-length: 100000000\r\ncontent-type: text/plain\r\n\r\n";
                let _ = sock.write_all(head.as_bytes()).await;
                let chunk = vec![b'a'; 1 << 20];
                for _ in 0..100 {
                    if sock.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let r = scrape_once(
        &client,
        &format!("http://{huge_addr}/metrics"),
        &engine("vllm"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(r, Err(ScrapeFailure::TooLarge));
    const { assert!(MAX_BODY_BYTES < 100_000_000) };
}

fn futures_stream(
    chunk: bytes::Bytes,
) -> impl tokio_stream::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    tokio_stream::iter(std::iter::repeat(chunk).map(Ok))
}

fn spec(name: &str, addr: SocketAddr, engine: Option<&str>) -> EndpointSpec {
    let mut labels = BTreeMap::new();
    if let Some(e) = engine {
        labels.insert(ENGINE_LABEL.to_owned(), e.to_owned());
    }
    EndpointSpec {
        key: EndpointKey {
            namespace: "ns".into(),
            name: name.into(),
        },
        address: addr,
        labels: Arc::new(labels),
    }
}

/// A collector running on a datastore of `specs`, scraping every 20 ms.
struct Collecting {
    by_name: Reader,
    tx: mpsc::Sender<DatastoreEvent>,
    metrics: Arc<EppMetrics>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// The datastore's published view.
struct Reader(SnapshotReader);

impl Reader {
    /// The endpoint named `name`, if it is in the view.
    fn endpoint(&self, name: &str) -> Option<Endpoint> {
        let snap = self.0.load();
        snap.endpoints.iter().find(|e| &*e.spec.key.name == name).cloned()
    }

    /// The metrics of the endpoint named `name`, if it is in the view.
    fn metrics(&self, name: &str) -> Option<EngineMetrics> {
        self.endpoint(name).map(|e| (*e.metrics).clone())
    }
}

impl Collecting {
    async fn start(specs: Vec<EndpointSpec>) -> Self {
        let clock = Arc::new(MonotonicClock::new());
        let (writer, reader) = DatastoreWriter::new(clock.clone());
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(writer.run(rx));
        tx.send(DatastoreEvent::ReplaceAll(specs)).await.unwrap();
        let metrics = Arc::new(EppMetrics::new().unwrap());
        let cancel = CancellationToken::new();
        let config = CollectorConfig {
            interval: Duration::from_millis(20),
            data_layer: Arc::new(DataLayer {
                source: DataSourceParams::default(),
                engines: builtin_engines(),
                default_engine: "vllm".into(),
                engine_label_key: ENGINE_LABEL.into(),
                enabled: true,
            }),
        };
        let task = tokio::spawn(run_collector(
            config,
            reader.clone(),
            tx.clone(),
            metrics.clone(),
            clock,
            cancel.clone(),
        ));
        Self {
            by_name: Reader(reader),
            tx,
            metrics,
            cancel,
            task,
        }
    }

    /// Poll (bounded: 2 s) until the metrics of `name` satisfy `done`; the last ones seen.
    async fn wait_for(&self, name: &str, done: impl Fn(&EngineMetrics) -> bool) -> EngineMetrics {
        for _ in 0..200 {
            if let Some(m) = self.by_name.metrics(name).filter(&done) {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{name}: {:?}", self.by_name.metrics(name));
    }
}

/// The slot evidence the `prefill-backlog-scorer`'s `recomputeQueue: auto` reads is carried from
/// scrape to scrape: a llama-server that keeps two requests queued behind its one running
/// request while that request answers (this EPP saw its first byte) is a one-slot server, and
/// stays one when it next reads idle; queued behind a request still prefilling it is not (yet);
/// the captured `-np 2` page (two running) is a batching one. The prompt it computes alone is
/// timed by the scrapes, which gives the endpoint its prefill rate.
#[tokio::test]
async fn scrapes_tell_a_one_slot_server_from_a_batching_one_and_remember_it() {
    let busy = Arc::new(AtomicBool::new(true));
    let page = {
        let busy = busy.clone();
        move || {
            let (running, waiting) = if busy.load(Ordering::Relaxed) {
                (1, 2)
            } else {
                (0, 0)
            };
            let text =
                format!("llamacpp:requests_processing {running}\nllamacpp:requests_deferred {waiting}\n");
            async move { text }
        }
    };
    let one_slot = serve(Router::new().route("/metrics", get(page))).await;
    let two_slots = serve_text(fixture("llamacpp.prom")).await;
    let c = Collecting::start(vec![
        spec("one-slot", one_slot, Some("llamacpp")),
        spec("two-slots", two_slots, Some("llamacpp")),
    ])
    .await;
    let m = c.wait_for("one-slot", |m| m.scraped_at.is_some()).await;
    assert_eq!((m.running, m.waiting), (1, 2));
    // Scraped again and again, but the running request has not answered yet.
    let first = m.scraped_at;
    let m = c.wait_for("one-slot", |m| m.scraped_at > first).await;
    assert_eq!(m.slots.queued_behind_answer, 0);
    assert!(!m.slots.one_slot(), "{:?}", m.slots);
    let live = c.by_name.endpoint("one-slot").unwrap().live;
    let mut answering = InFlight::start(&live, 100, 90);
    answering.first_byte();
    let m = c.wait_for("one-slot", |m| m.slots.one_slot()).await;
    assert_eq!((m.slots.peak_running, m.slots.queued_through_answer), (1, true));
    drop(answering);
    // The next prompt computes alone (nothing answers ahead of it) for at least 200 ms before its
    // first byte: the scrapes time it, so the endpoint's learned rate is at most 500 tokens over
    // 0.2 s.
    let mut head = InFlight::start(&live, 600, 500);
    let before = c.by_name.metrics("one-slot").unwrap().scraped_at;
    let seen = c.wait_for("one-slot", |m| m.scraped_at > before).await.scraped_at;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        c.by_name.metrics("one-slot").unwrap().head.tokens_per_second(),
        None
    );
    head.first_byte();
    let m = c
        .wait_for("one-slot", |m| {
            m.scraped_at > seen && m.head.tokens_per_second().is_some()
        })
        .await;
    let rate = m.head.tokens_per_second().unwrap();
    assert!(rate > 0.0 && rate <= 2_500.0, "{rate} tokens/s");
    drop(head);
    busy.store(false, Ordering::Relaxed);
    let m = c.wait_for("one-slot", |m| m.waiting == 0).await;
    assert!(
        m.slots.one_slot(),
        "an idle scrape keeps the evidence: {:?}",
        m.slots
    );
    let m = c.wait_for("two-slots", |m| m.scraped_at.is_some()).await;
    assert_eq!(m.slots.peak_running, 2);
    assert!(!m.slots.one_slot());
    c.cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), c.task)
        .await
        .expect("collector stops on cancel")
        .unwrap();
}

#[tokio::test]
async fn a_slow_pod_delays_nobody_and_failures_keep_the_last_values() {
    let good = serve_text(fixture("vllm-v1-full.prom")).await;
    let sglang = serve_text(fixture("sglang.prom")).await;
    let slow = serve(Router::new().route(
        "/metrics",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            ""
        }),
    ))
    .await;
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();

    let c = Collecting::start(vec![
        spec("good", good, None),
        spec("sglang", sglang, Some("sglang")),
        spec("slow", slow, None),
        spec("dead", dead, None),
    ])
    .await;
    let (tx, metrics, cancel, task) = (c.tx.clone(), c.metrics.clone(), c.cancel.clone(), c.task);
    let by_name = |name: &str| c.by_name.metrics(name);

    // Bounded wait for the healthy pods' values (each scrape is at most one 18 ms timeout).
    let mut ok = false;
    for _ in 0..200 {
        let g = by_name("good");
        let s = by_name("sglang");
        let d = by_name("dead");
        if g.is_some_and(|m| m.waiting == 7)
            && s.is_some_and(|m| m.waiting == 2826)
            && d.is_some_and(|m| m.last_error == Some(ScrapeFailure::Connect))
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok, "healthy pods are scraped while one pod hangs and one is dead");
    let slow_m = by_name("slow").unwrap();
    assert_eq!(slow_m.scraped_at, None, "never scraped: unknown, not idle");
    let text = metrics.render();
    assert!(
        text.contains("inference_extension_model_server_scrape_errors_total{reason=\"connect\"}"),
        "{text}"
    );

    // The endpoint leaves: its loop stops and the collector keeps serving the others.
    tx.send(DatastoreEvent::Remove(EndpointKey {
        namespace: "ns".into(),
        name: "slow".into(),
    }))
    .await
    .unwrap();
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("collector stops on cancel")
        .unwrap();
}
