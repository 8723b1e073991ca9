//! The soak's traffic: the EPP config it runs behind, the seeded request shapes of the four
//! tenants, and one request sent and read as its client would.

use rand::{Rng, rngs::SmallRng};
use tokio::time::Instant;

use super::Outcome;

pub(super) const CONFIG: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: prompt-guard
  name: pii
  parameters:
    request:
      regex:
        builtins: [EMAIL]
    response:
      regex:
        builtins: [CREDIT_CARD]
- type: token-budget
  parameters:
    window: 24h
    tenants:
      ledger: {tokens: 1000000000000}
      small:
        tokens: 3000000
        models:
          big: {tokens: 400000, fallbackModel: cheap}
    store:
      redis: {url: 'redis://127.0.0.1:REDIS_PORT', timeout: 100ms}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: kv-cache-utilization-scorer
  - pluginRef: prefix-cache-scorer
";

pub(super) const EMAIL: &str = "jane.doe@example.org";
pub(super) const CARD: &str = "4111 1111 1111 1111";

/// One request's shape, drawn from the seeded generator.
pub(super) struct Shape {
    tenant: &'static str,
    chat: bool,
    stream: bool,
    prompt_tokens: usize,
    max_tokens: u64,
    vanish: bool,
    group: u32,
}

pub(super) fn draw(rng: &mut SmallRng) -> Shape {
    let tenant = match rng.random_range(0..100) {
        0..45 => "ledger",
        45..60 => "small",
        60..75 => "guarded",
        _ => "others",
    };
    // Log-uniform 1k..100k tokens; guarded prompts stay short (the pod echoes them).
    let prompt_tokens = if tenant == "guarded" {
        1000
    } else {
        (1000.0 * 100f64.powf(rng.random::<f64>())) as usize
    };
    Shape {
        tenant,
        chat: rng.random_bool(0.5),
        stream: tenant == "others" || (tenant != "guarded" && rng.random_bool(0.5)),
        prompt_tokens,
        max_tokens: rng.random_range(8..64),
        vanish: tenant == "others" && rng.random_bool(0.4),
        group: rng.random_range(0..8),
    }
}

/// A warm-up request: short, and its client stays.
pub(super) fn draw_warm_up(rng: &mut SmallRng) -> Shape {
    Shape {
        prompt_tokens: 1000,
        vanish: false,
        ..draw(rng)
    }
}

pub(super) fn prompt(shape: &Shape, serial: u64) -> String {
    let mut text = String::with_capacity(shape.prompt_tokens * 4 + 64);
    if shape.tenant == "guarded" {
        text.push_str(&format!("Repeat: mail {EMAIL}, card {CARD}. "));
    }
    // A shared prefix per group (prefix-cache hits), then a unique tail.
    let shared = shape.prompt_tokens * 3 / 4;
    while text.len() < shared * 4 {
        text.push_str(&format!("group {} shared context line. ", shape.group));
    }
    while text.len() < shape.prompt_tokens * 4 {
        text.push_str(&format!("request {serial} own words. "));
    }
    text
}

/// Send one request and read its answer as its client would.
pub(super) async fn one(
    client: reqwest::Client,
    url: String,
    shape: Shape,
    serial: u64,
    t0: Instant,
) -> Outcome {
    let text = prompt(&shape, serial);
    let model = if shape.tenant == "small" { "big" } else { "m" };
    let mut body = if shape.chat {
        serde_json::json!({"model": model, "messages": [{"role": "user", "content": text}]})
    } else {
        serde_json::json!({"model": model, "prompt": text})
    };
    body["max_tokens"] = shape.max_tokens.into();
    if shape.stream {
        body["stream"] = true.into();
        if shape.tenant == "ledger" {
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
    }
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut outcome = Outcome {
        tenant: shape.tenant,
        start: t0.elapsed().as_secs_f64(),
        end: 0.0,
        status: None,
        vanished: false,
        broken: false,
        usage: None,
        estimate: (text.len() / 4) as u64 + shape.max_tokens,
        guard_violation: false,
    };
    let path = if shape.chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    let mut request = client
        .post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .header("x-gateway-inference-fairness-id", shape.tenant)
        .body(bytes);
    if shape.tenant == "guarded" {
        request = request.header("x-emulator-echo", "1");
    }
    match request.send().await {
        Err(_) => {}
        Ok(mut response) => {
            outcome.status = Some(response.status().as_u16());
            let mut body = Vec::new();
            loop {
                match response.chunk().await {
                    Ok(Some(chunk)) => {
                        body.extend_from_slice(&chunk);
                        if shape.vanish {
                            outcome.vanished = true;
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {
                        outcome.broken = true;
                        break;
                    }
                }
            }
            if outcome.status == Some(200) && !outcome.vanished && !outcome.broken {
                read_answer(&mut outcome, &shape, &body);
            }
        }
    }
    outcome.end = t0.elapsed().as_secs_f64();
    outcome
}

/// Usage, guard and completeness checks on a whole 200 answer.
pub(super) fn read_answer(outcome: &mut Outcome, shape: &Shape, body: &[u8]) {
    let total = |v: &serde_json::Value| {
        let u = v.get("usage")?;
        Some(u.get("prompt_tokens")?.as_u64()? + u.get("completion_tokens")?.as_u64()?)
    };
    if shape.stream {
        let text = String::from_utf8_lossy(body);
        if !text.trim_end().ends_with("data: [DONE]") {
            outcome.broken = true;
        }
        let mut events = Vec::new();
        epp::parser::EventSplitter::default().feed_with(body, true, |e| events.push(e.to_vec()));
        outcome.usage = events
            .iter()
            .filter_map(|e| e.trim_ascii().strip_prefix(b"data: "))
            .filter_map(|d| serde_json::from_slice::<serde_json::Value>(d).ok())
            .find_map(|v| total(&v));
    } else {
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) => outcome.usage = total(&v),
            Err(_) => outcome.broken = true,
        }
    }
    if shape.tenant == "guarded" {
        let text = String::from_utf8_lossy(body);
        outcome.guard_violation = text.contains(CARD) || !text.contains(EMAIL);
    }
}
