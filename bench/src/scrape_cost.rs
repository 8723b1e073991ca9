//! Measures what scraping costs the EPP: N model-server pages served by a separate process,
//! scraped by the EPP's own collector at the configured interval, CPU time of this process
//! (the collector, its HTTP client and the datastore writer) read from `/proc/self/stat`.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use axum::{Router, routing::get};
use epp::{
    clock::MonotonicClock,
    datastore::{DatastoreEvent, DatastoreWriter, EndpointKey, EndpointSpec},
    metrics::exported::EppMetrics,
    scrape::{
        collector::{CollectorConfig, run_collector},
        data_layer::{DataLayer, DataSourceParams, ENGINE_LABEL},
        engines::builtin_engines,
    },
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A realistic vLLM V1 page (two data-parallel ranks, every histogram; ~90 KB).
pub const FULL_VLLM_PAGE: &str = include_str!("../../tests/fixtures/vllm-v1-full.prom");

/// Serve `page` on `count` ports of 127.0.0.1; prints `ports p1,p2,...` once listening.
///
/// # Errors
/// When a port cannot be bound.
pub async fn serve_pages(count: usize, page: String) -> anyhow::Result<()> {
    let page: Arc<str> = page.into();
    let mut ports = Vec::new();
    for _ in 0..count {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        ports.push(listener.local_addr()?.port().to_string());
        let page = page.clone();
        let app = Router::new().route(
            "/metrics",
            get(move || {
                let p = page.clone();
                async move { p.to_string() }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
    println!("ports {}", ports.join(","));
    std::future::pending::<()>().await;
    Ok(())
}

fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("bad /proc/self/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        fields.get(11).context("utime")?.parse::<f64>()? + fields.get(12).context("stime")?.parse::<f64>()?;
    Ok(ticks / 100.0) // USER_HZ is 100 on Linux
}

/// Result of one measurement.
#[derive(Debug)]
pub struct ScrapeCost {
    /// Cores used by this process while scraping.
    pub cores: f64,
    /// Scrapes completed per second.
    pub scrapes_per_second: f64,
    /// Failed scrapes.
    pub errors: u64,
}

/// `epp-bench serve-pages` as a child process: `count` metrics pages on 127.0.0.1, killed on drop.
pub struct PageServer {
    child: Child,
    /// Where the pages are.
    pub addrs: Vec<SocketAddr>,
}

impl PageServer {
    /// Start it (serving `page_file`, or the full vLLM page), on `cpus` when given.
    ///
    /// # Errors
    /// When it cannot start or does not report its ports.
    pub fn start(count: usize, page_file: Option<&str>, cpus: Option<&str>) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut cmd = crate::epp_process::pinned_command(&exe, cpus);
        cmd.arg("serve-pages").arg("--count").arg(count.to_string());
        if let Some(f) = page_file {
            cmd.arg("--page").arg(f);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?;
        let mut line = String::new();
        let read = child
            .stdout
            .take()
            .context("child stdout")
            .and_then(|out| Ok(BufReader::new(out).read_line(&mut line)?));
        let ports = match (read, line.trim().strip_prefix("ports ")) {
            (Ok(_), Some(ports)) => ports.to_owned(),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("page server did not start: {line:?}");
            }
        };
        let addrs = ports
            .split(',')
            .filter_map(|p| p.parse::<u16>().ok())
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect();
        Ok(Self { child, addrs })
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Scrape `endpoints` pages every `interval` for `seconds` and report the cost. With
/// `pages_cpus` (a `taskset -c` list) the page server runs on those CPUs, as remote pods would
/// be; otherwise it inherits this process's CPUs.
///
/// # Errors
/// When the page server cannot be started.
pub async fn measure(
    endpoints: usize,
    interval: Duration,
    seconds: u64,
    page_file: Option<String>,
    pages_cpus: Option<String>,
) -> anyhow::Result<ScrapeCost> {
    let pages = PageServer::start(endpoints, page_file.as_deref(), pages_cpus.as_deref())?;
    let addrs = pages.addrs.clone();

    let clock = Arc::new(MonotonicClock::new());
    let (writer, reader) = DatastoreWriter::new(clock.clone());
    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    tokio::spawn(writer.run(rx));
    let specs = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| EndpointSpec {
            key: EndpointKey {
                namespace: "bench".into(),
                name: format!("pod-{i}").into(),
            },
            address: *a,
            labels: Default::default(),
        })
        .collect();
    tx.send(DatastoreEvent::ReplaceAll(specs)).await?;
    let metrics = Arc::new(EppMetrics::new()?);
    let cancel = CancellationToken::new();
    let config = CollectorConfig {
        interval,
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
        reader,
        tx,
        metrics.clone(),
        clock,
        cancel.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await; // warm-up: connections open, first scrapes
    let (cpu0, n0, t0) = (
        cpu_seconds()?,
        metrics.scrape_duration.get_sample_count(),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (cpu1, n1, wall) = (
        cpu_seconds()?,
        metrics.scrape_duration.get_sample_count(),
        t0.elapsed().as_secs_f64(),
    );
    let errors: u64 = ["timeout", "connect", "http_status", "too_large", "parse"]
        .iter()
        .map(|r| metrics.scrape_errors.with_label_values(&[r]).get())
        .sum();
    cancel.cancel();
    let _ = task.await;
    drop(pages);
    Ok(ScrapeCost {
        cores: (cpu1 - cpu0) / wall,
        scrapes_per_second: (n1 - n0) as f64 / wall,
        errors,
    })
}

/// The default page, or `page_file`'s content.
///
/// # Errors
/// When the file cannot be read.
pub fn page(page_file: Option<&str>) -> anyhow::Result<String> {
    match page_file {
        Some(f) => Ok(std::fs::read_to_string(f)?),
        None => Ok(FULL_VLLM_PAGE.to_owned()),
    }
}

/// `epp-bench scrape-cost` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ScrapeCostArgs {
    /// Pods to scrape.
    #[arg(long, default_value_t = 100)]
    pub endpoints: usize,
    /// Scrape interval (Go duration).
    #[arg(long, default_value = "50ms", value_parser = epp::config::parse_duration)]
    pub interval: Duration,
    /// Measurement time in seconds (after a 1 s warm-up).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Page to serve instead of the built-in full vLLM V1 page.
    #[arg(long)]
    pub page: Option<String>,
    /// Run the page server on these CPUs (`taskset -c` list), apart from the collector's
    /// (`taskset -c 0 epp-bench scrape-cost --pages-cpus 1`), as remote pods would be.
    #[arg(long)]
    pub pages_cpus: Option<String>,
}

/// Run `epp-bench scrape-cost` and print the collector's cost.
///
/// # Errors
/// The page server could not start or the CPU time could not be read.
pub async fn run_cli(args: ScrapeCostArgs) -> anyhow::Result<()> {
    let ScrapeCostArgs {
        endpoints,
        interval,
        seconds,
        page,
        pages_cpus,
    } = args;
    let cost = measure(endpoints, interval, seconds, page, pages_cpus).await?;
    println!(
        "{endpoints} endpoints every {interval:?}: {:.0} scrapes/s, {:.3} cores ({:.1} µs CPU per scrape), {} errors",
        cost.scrapes_per_second,
        cost.cores,
        cost.cores / cost.scrapes_per_second.max(1e-9) * 1e6,
        cost.errors
    );
    Ok(())
}

/// `epp-bench serve-pages` arguments (scrape-cost's separate page server process).
#[derive(Debug, Clone, clap::Args)]
pub struct ServePagesArgs {
    /// Ports to serve.
    #[arg(long)]
    pub count: usize,
    /// Page file.
    #[arg(long)]
    pub page: Option<String>,
}

/// Run `epp-bench serve-pages` until killed.
///
/// # Errors
/// The page file could not be read or a port could not be bound.
pub async fn serve_pages_cli(args: ServePagesArgs) -> anyhow::Result<()> {
    serve_pages(args.count, page(args.page.as_deref())?).await
}
