use super::*;

fn ms(text: &str) -> u64 {
    let t: Timestamp = text.parse().unwrap();
    u64::try_from(t.as_millisecond()).unwrap()
}

fn berlin() -> TimeZone {
    TimeZone::get("Europe/Berlin").unwrap()
}

fn tokens(period: Period, amount: u64) -> Limit {
    Limit {
        period,
        unit: Unit::Tokens,
        amount,
    }
}

fn policy() -> BudgetPolicy {
    let mut team = TenantBudget {
        limits: vec![
            tokens(Period::fixed(Duration::from_secs(60)), 500),
            tokens(Period::Day, 5000),
        ],
        models: HashMap::new(),
    };
    team.models.insert(
        "gpt-4o".into(),
        ModelBudget {
            limits: vec![Limit {
                period: Period::Month,
                unit: Unit::Spend,
                amount: 20 * NANOS_PER_UNIT,
            }],
            fallback_model: Some("llama".into()),
        },
    );
    BudgetPolicy {
        prices: [(
            "gpt-4o".to_owned(),
            Prices {
                input: 2_500_000_000,
                cached_input: 1_250_000_000,
                output: 10 * NANOS_PER_UNIT,
            },
        )]
        .into(),
        tenants: [("team-a".to_owned(), team)].into(),
        default_tenant: Some(TenantBudget {
            limits: vec![tokens(Period::fixed(Duration::from_secs(60)), 50)],
            models: HashMap::new(),
        }),
        ..BudgetPolicy::default()
    }
}

#[test]
fn counters_come_tenant_first_each_in_its_window() {
    let p = policy();
    let now = ms("2026-12-02T16:00:30.500Z");
    let c = p.counters("team-a", "gpt-4o", now);
    let names: Vec<String> = c.iter().map(Counter::name).collect();
    assert_eq!(
        names,
        ["tenant-60s-tokens", "tenant-day-tokens", "model-month-spend"]
    );
    assert_eq!(c[0].window.remaining_ms, 29_500);
    assert_eq!(c[1].window.ends_ms, ms("2026-12-03T00:00:00Z"));
    assert_eq!(c[2].window.ends_ms, ms("2027-01-01T00:00:00Z"));
    assert_eq!(c[2].key.layer, LayerKey::model("team-a", "gpt-4o"));
    assert_eq!(c[2].limit, 20_000_000_000);
    // Unlisted tenants get the default tenant's limits; an unlimited model adds none.
    assert_eq!(p.counters("stranger", "x", now).len(), 1);
    assert_eq!(p.counters("team-a", "other", now).len(), 2);
    assert!(p.applies("stranger", "x"));
    assert_eq!(p.fallback("team-a", "gpt-4o"), Some("llama"));
    assert_eq!(p.fallback("team-a", "other"), None);
    let unlimited = BudgetPolicy::default();
    assert!(!unlimited.applies("team-a", "x"));
    assert!(unlimited.counters("team-a", "x", now).is_empty());
}

#[test]
fn fixed_windows_are_epoch_multiples() {
    let w = Period::fixed(Duration::from_secs(60)).window_at(61_500, &TimeZone::UTC);
    assert_eq!(
        w,
        Window {
            id: 1,
            ends_ms: 120_000,
            remaining_ms: 58_500
        }
    );
    assert_eq!(Period::fixed(Duration::from_millis(1500)).label(), "1500ms");
    assert_eq!(Period::fixed(Duration::from_secs(3600)).label(), "3600s");
}

#[test]
fn calendar_windows_follow_the_local_calendar() {
    let tz = berlin();
    // 23:30 UTC on 2 December is 00:30 on 3 December in Berlin: a new local day.
    let late = ms("2026-12-02T23:30:00Z");
    let day = Period::Day.window_at(late, &tz);
    assert_eq!(day.id * 1000, ms("2026-12-02T23:00:00Z"));
    assert_eq!(day.ends_ms, ms("2026-12-03T23:00:00Z"));
    assert_eq!(day.remaining_ms, 23 * 3_600_000 + 1_800_000);
    // One millisecond earlier in UTC terms, still 2 December locally? No: 23:00 UTC is the
    // local midnight; 22:59:59.999 UTC is the previous local day.
    let before = Period::Day.window_at(ms("2026-12-02T22:59:59.999Z"), &tz);
    assert_eq!(before.ends_ms, ms("2026-12-02T23:00:00Z"));
    assert_eq!(before.remaining_ms, 1);
    assert_ne!(before.id, day.id);
    // The spring change makes a 23-hour day.
    let spring = Period::Day.window_at(ms("2026-03-29T10:00:00Z"), &tz);
    assert_eq!(spring.id * 1000, ms("2026-03-28T23:00:00Z"));
    assert_eq!(spring.ends_ms, ms("2026-03-29T22:00:00Z"));
    // The autumn change makes a 25-hour day (Sunday 25 October 2026: 22:00 UTC the evening
    // before, in summer time, to 23:00 UTC, in winter time).
    let autumn = Period::Day.window_at(ms("2026-10-25T12:00:00Z"), &tz);
    assert_eq!(autumn.id * 1000, ms("2026-10-24T22:00:00Z"));
    assert_eq!(autumn.ends_ms, ms("2026-10-25T23:00:00Z"));
    assert_eq!(autumn.remaining_ms, 11 * 3_600_000);
    // Weeks start on Monday: Wednesday 2 December 2026 is in the week of Monday 30 November.
    let week = Period::Week.window_at(ms("2026-12-02T12:00:00Z"), &tz);
    assert_eq!(week.id * 1000, ms("2026-11-29T23:00:00Z"));
    assert_eq!(week.ends_ms, ms("2026-12-06T23:00:00Z"));
    // Months end at the next month's local midnight (January's first, here).
    let month = Period::Month.window_at(ms("2026-12-31T22:59:59Z"), &tz);
    assert_eq!(month.id * 1000, ms("2026-11-30T23:00:00Z"));
    assert_eq!(month.ends_ms, ms("2026-12-31T23:00:00Z"));
    assert_eq!(month.remaining_ms, 1000);
    let january = Period::Month.window_at(ms("2026-12-31T23:00:00Z"), &tz);
    assert_eq!(january.id * 1000, ms("2026-12-31T23:00:00Z"));
    // In UTC the same instant is still December.
    assert_eq!(
        Period::Month
            .window_at(ms("2026-12-31T23:00:00Z"), &TimeZone::UTC)
            .ends_ms,
        ms("2027-01-01T00:00:00Z")
    );
}

#[test]
fn prices_cost_cached_tokens_less_and_round_up() {
    let p = policy();
    let gpt = p.prices("gpt-4o");
    // 1000 uncached prompt tokens at 2.50/M, 500 output at 10/M: 0.0025 + 0.005.
    assert_eq!(gpt.cost(1000, 0, 500), 7_500_000);
    // 800 of the prompt cached at 1.25/M: 200 × 2500 + 800 × 1250 + 500 × 10000 nano units.
    assert_eq!(gpt.cost(1000, 800, 500), 500_000 + 1_000_000 + 5_000_000);
    // Cached beyond the prompt counts as the whole prompt cached.
    assert_eq!(gpt.cost(10, 50, 0), gpt.cost(10, 10, 0));
    // Fractions of a nano unit round up.
    let odd = Prices {
        input: 1,
        cached_input: 0,
        output: 0,
    };
    assert_eq!(odd.cost(1, 0, 0), 1);
    assert_eq!(
        p.estimate("gpt-4o", 1000, Some(500)),
        Charge {
            tokens: 1500,
            nanos: 7_500_000
        }
    );
    // Without a price a model costs nothing; without max_tokens the default output counts.
    assert_eq!(
        p.estimate("llama", 100, None),
        Charge {
            tokens: 356,
            nanos: 0
        }
    );
    assert_eq!(
        p.actual("gpt-4o", 1000, 800, 500, 1400),
        Charge {
            tokens: 1500,
            nanos: 6_500_000
        }
    );
}

#[test]
fn money_and_reset_text() {
    assert_eq!(money_text(500 * NANOS_PER_UNIT), "500.00");
    assert_eq!(money_text(12_500_000), "0.0125");
    assert_eq!(money_text(1), "0.000000001");
    assert_eq!(money_text(10_000_000), "0.01");
    assert_eq!(reset_text(12), "12ms");
    assert_eq!(reset_text(36_500), "37s");
    assert_eq!(reset_text(360_000), "6m0s");
    assert_eq!(reset_text(3_600_000), "1h0m0s");
}

#[test]
fn soft_threshold_is_inclusive() {
    let p = BudgetPolicy {
        soft_threshold_permille: Some(800),
        ..BudgetPolicy::default()
    };
    assert!(p.past_soft_threshold(80, 100));
    assert!(!p.past_soft_threshold(79, 100));
    assert!(!BudgetPolicy::default().past_soft_threshold(100, 100));
}

#[test]
fn the_calendar_memo_answers_as_the_calendar_does() {
    let tz = berlin();
    let memo = CalendarMemo::default();
    // Every 7 minutes for 70 days around the autumn change and a month end, and back in time
    // once (a replica whose clock stepped back).
    let start = ms("2026-10-01T00:00:00Z");
    let mut times: Vec<u64> = (0..14_400).map(|i| start + i * 420_000).collect();
    times.push(start);
    for now in times {
        for period in [
            Period::Day,
            Period::Week,
            Period::Month,
            Period::fixed(Duration::from_secs(60)),
        ] {
            assert_eq!(
                memo.window_at(period, now, &tz),
                period.window_at(now, &tz),
                "{period:?} at {now}"
            );
        }
    }
}
