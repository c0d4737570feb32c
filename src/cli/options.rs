//! Sizes with suffixes and `-o key=value,...` option lists, as qemu-img reads them.

/// Parses `512`, `64k`, `10M`, `1G`, `2T` (powers of 1024; an optional trailing `B`/`b`
/// after the suffix, so `10MB` and `10MiB` mean the same).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(format!("invalid size {s:?}: it must start with a number"));
    }
    let number: u64 = t[..digits_end]
        .parse()
        .map_err(|_| format!("invalid size {s:?}: number too large"))?;
    let suffix = t[digits_end..].to_ascii_lowercase();
    let shift = match suffix.trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        "e" => 60,
        _ => return Err(format!("invalid size {s:?}: unknown suffix {suffix:?}")),
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// Splits `a=1,b=2` into pairs. A bare word (`help`) becomes a key with an empty value.
pub fn parse_option_list(list: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        if k.is_empty() {
            return Err(format!("invalid option {part:?}"));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("10M"), Ok(10 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999E").is_err());
    }

    #[test]
    fn option_lists() {
        assert_eq!(
            parse_option_list("block_size=1M,subformat=fixed").unwrap(),
            vec![
                ("block_size".to_string(), "1M".to_string()),
                ("subformat".to_string(), "fixed".to_string())
            ]
        );
        assert!(parse_option_list("=x").is_err());
    }
}
