//! Reader for the Azure LLM inference traces (2023, Splitwise): CSV rows of
//! `TIMESTAMP,ContextTokens,GeneratedTokens`. There is no prefix information, so every request
//! gets blocks of its own (no sharing).

use super::{TraceRequest, Workload};

/// Block granularity used for the synthesized (unshared) prompts.
pub const BLOCK_TOKENS: u32 = 512;

/// Parse an Azure trace; times become relative to the first row.
///
/// # Errors
/// The first malformed row, with its line number.
pub fn parse(name: &str, text: &str) -> Result<Workload, String> {
    let mut requests = Vec::new();
    let mut first: Option<i128> = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || (i == 0 && line.starts_with("TIMESTAMP")) {
            continue;
        }
        let err = |what: &str| format!("{name}:{}: {what}: {line:?}", i + 1);
        let mut cols = line.split(',');
        let (Some(ts), Some(ctx), Some(gen_tokens)) = (cols.next(), cols.next(), cols.next()) else {
            return Err(err("expected TIMESTAMP,ContextTokens,GeneratedTokens"));
        };
        let at = parse_timestamp_ns(ts).ok_or_else(|| err("bad timestamp"))?;
        let input: u32 = ctx.trim().parse().map_err(|_| err("bad ContextTokens"))?;
        let output: u32 = gen_tokens
            .trim()
            .parse()
            .map_err(|_| err("bad GeneratedTokens"))?;
        let origin = *first.get_or_insert(at);
        let row = requests.len() as u64;
        let blocks = input.div_ceil(BLOCK_TOKENS).max(1);
        requests.push(TraceRequest {
            arrival_ns: u64::try_from(at - origin).unwrap_or(0),
            input_tokens: input.max(1),
            output_tokens: output.max(1),
            // Ids no other row uses: the row number in the high bits.
            blocks: (0..u64::from(blocks))
                .map(|b| (1 << 62) | (row << 20) | b)
                .collect(),
            adapter: None,
            tenant: None,
        });
    }
    Ok(Workload::by_arrival(name, BLOCK_TOKENS, requests))
}

/// `YYYY-MM-DD HH:MM:SS[.fffffff]` → ns since the Unix epoch (UTC).
fn parse_timestamp_ns(ts: &str) -> Option<i128> {
    let (date, time) = ts.trim().split_once(' ')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, min, s) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || min > 59 || s > 60 {
        return None;
    }
    let digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let nanos: i128 = if digits.is_empty() {
        0
    } else {
        digits.parse::<i128>().ok()? * 10i128.pow(9 - digits.len() as u32)
    };
    let days = days_from_civil(y, m, day);
    Some((i128::from(days) * 86_400 + i128::from(h * 3600 + min * 60 + s)) * 1_000_000_000 + nanos)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_relative_and_exact_to_the_tenth_of_a_microsecond() {
        let w = parse(
            "a.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n\
             2023-11-16 18:17:03.9799600,4808,10\n\
             2023-11-16 18:17:04.0312520,3180,8\n\
             2023-11-17 00:00:00.0000000,1,1",
        )
        .unwrap();
        let at: Vec<u64> = w.requests.iter().map(|r| r.arrival_ns).collect();
        assert_eq!(at, vec![0, 51_292_000, 20_576_020_040_000]);
        assert_eq!(w.requests[0].blocks.len(), 10);
        assert_ne!(
            w.requests[0].blocks[0], w.requests[1].blocks[0],
            "rows share nothing"
        );
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn bad_rows_are_named() {
        let e = parse(
            "a.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,x,1",
        )
        .unwrap_err();
        assert_eq!(e, "a.csv:2: bad ContextTokens: \"2023-11-16 18:17:03.9,x,1\"");
        let e = parse("a.csv", "2023-13-16 18:17:03.9,1,1").unwrap_err();
        assert!(e.contains("bad timestamp"), "{e}");
    }
}
