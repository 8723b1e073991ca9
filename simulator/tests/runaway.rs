//! `epp-sim runaway`'s story, replayed small: a daily money budget stops the retry loop at its
//! limit, lets it in again at local midnight, and leaves the other tenants untouched; without
//! it the loop's spend is every request at the list price.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use clap::Parser;
use epp_sim::runaway::{RUNAWAY, RunawayArgs, simulate};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: RunawayArgs,
}

fn args(extra: &[&str]) -> RunawayArgs {
    Cli::parse_from(std::iter::once("runaway").chain(extra.iter().copied())).args
}

#[test]
fn a_daily_money_budget_stops_the_loop_until_local_midnight_and_spares_the_others() {
    // 23:00 in Berlin; two hours: the budget's day turns after one.
    let a = args(&[
        "--start=2026-12-04T22:00:00Z",
        "--hours=2",
        "--daily-spend=2",
        "--tenants=2",
        "--tenant-every=60",
    ]);
    let runs = simulate(&a).unwrap();
    let [(free_name, free), (capped_name, capped)] = &runs[..] else {
        panic!("two runs expected")
    };
    assert_eq!(
        (free_name.as_str(), capped_name.as_str()),
        ("no budget", "$2/day")
    );
    // Without a budget every request is served: 7,200 at one per second. The first costs its
    // 6,000 prompt tokens at 3.00/M and 400 output tokens at 15/M (0.024); every later one
    // finds the prompt cached but its last 16-token block, which the engine computes again:
    // 5,984 tokens at 0.30/M, 16 at 3.00/M, the output as before (0.0078432).
    const FIRST: u64 = 24_000_000;
    const REPEAT: u64 = 5_984 * 300 + 16 * 3_000 + 400 * 15_000;
    let loose = &free[RUNAWAY];
    assert_eq!((loose.requests, loose.served, loose.refused), (7_200, 7_200, 0));
    assert_eq!(loose.spend_nanos(), FIRST + 7_199 * REPEAT);
    // With $2 a day: refused on both local days, served again after midnight. Each admission
    // reserves the list price (0.024) until its usage settles, so a day stops a few requests
    // short of 2 / 0.0078432 = 255: the reservations still in flight hold the rest.
    let tight = &capped[RUNAWAY];
    assert_eq!(tight.first_refusals.len(), 2, "refused on both local days");
    let days: Vec<usize> = tight.served_by_day.values().copied().collect();
    let [before, after] = days[..] else {
        panic!("{:?}", tight.served_by_day)
    };
    assert!((240..=252).contains(&before), "{before} before midnight");
    assert!((240..=255).contains(&after), "{after} after midnight");
    assert_eq!(tight.served, before + after);
    assert_eq!(tight.spend_nanos(), FIRST + (tight.served as u64 - 1) * REPEAT);
    assert!(FIRST + (before as u64 - 1) * REPEAT <= 2_000_000_000);
    assert!(after as u64 * REPEAT <= 2_000_000_000);
    // The well-behaved tenants: the same requests served in both runs, nothing refused.
    for team in ["team-1", "team-2"] {
        assert_eq!(capped[team].refused, 0, "{team}");
        assert_eq!(capped[team].served, free[team].served, "{team}");
        assert_eq!(capped[team].spend_nanos(), free[team].spend_nanos(), "{team}");
    }
}
