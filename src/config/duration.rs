//! Go-style durations (`50ms`, `1.5s`, `1m`), as the Go EPP's flags and config spell them. Pure:
//! the config, the flags and the simulator's arguments share this one reader.

use std::time::Duration;

/// Parse a Go-style duration: `50ms`, `2s`, `1m`, `1h`, `1.5s`, `250us`, `0`.
///
/// # Errors
/// A message naming the bad value.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("invalid duration {s:?}: missing unit (ms, s, m, h)"))?;
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let seconds_per_unit = match unit {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("invalid duration {s:?}: unknown unit {unit:?}")),
    };
    Duration::try_from_secs_f64(value * seconds_per_unit).map_err(|e| format!("invalid duration {s:?}: {e}"))
}
