//! Short names of the group weight formats (`W3G128`, `W2CH`, `NF3G64`, `NF4CHA8KV4`): parsing,
//! canonical printing and round trips, and the errors of malformed names. The symmetric names
//! (`W4A8KV4`) are tested next to the parser in `src/name.rs`.

use qat_quant::{ActQuant, KvQuant, Scheme, WeightGrad, WeightQuant};

fn parse(s: &str) -> Scheme {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

#[test]
fn group_format_names_parse_and_round_trip() {
    let (a8, kv4) = (Some(ActQuant { bits: 8 }), Some(KvQuant::per_token(4)));
    for (input, canonical, weight, act, kv) in [
        (
            "W3G128",
            "W3G128",
            WeightQuant::asym_group(3, Some(128)),
            None,
            None,
        ),
        (
            "w2g64a8kv4",
            "W2G64A8KV4",
            WeightQuant::asym_group(2, Some(64)),
            a8,
            kv4,
        ),
        ("W4CH", "W4CH", WeightQuant::asym_group(4, None), None, None),
        (
            "w4chA8",
            "W4CHA8",
            WeightQuant::asym_group(4, None),
            a8,
            None,
        ),
        (
            "W8G1KV16",
            "W8G1",
            WeightQuant::asym_group(8, Some(1)),
            None,
            None,
        ),
        ("NF3G64", "NF3G64", WeightQuant::nf3(Some(64)), None, None),
        ("nf3ch", "NF3CH", WeightQuant::nf3(None), None, None),
        (
            "NF4G32KV4",
            "NF4G32KV4",
            WeightQuant::nf4(Some(32)),
            None,
            kv4,
        ),
        (
            " nf4chA8KV4 ",
            "NF4CHA8KV4",
            WeightQuant::nf4(None),
            a8,
            kv4,
        ),
    ] {
        let s = parse(input);
        assert_eq!(s, Scheme::new(Some(weight), act, kv), "{input}");
        assert_eq!(s.to_string(), canonical, "{input}");
        assert_eq!(parse(canonical), s, "{input}");
    }
    // A non-default gradient has no short name: Display writes JSON, which parses back.
    let ste = Scheme::new(
        Some(WeightQuant::asym_group(3, Some(64)).with_grad(WeightGrad::Ste)),
        None,
        None,
    );
    assert_eq!(ste.short_name(), None);
    assert!(ste.to_string().contains(r#""grad":"ste""#), "{ste}");
    assert_eq!(parse(&ste.to_string()), ste);
}

#[test]
fn invalid_group_names_explain_themselves() {
    let err = |s: &str| s.parse::<Scheme>().unwrap_err().to_string();
    for (input, want) in [
        ("W4G", "missing group size after \"G\""),
        ("W4GA8", "missing group size after \"G\""),
        (
            "W4G0",
            "group size 0 (expected >= 1, or CH for per channel)",
        ),
        (
            "W3G99999999999999999999999",
            "group size 99999999999999999999999 too large",
        ),
        (
            "NF4",
            "missing group after NF4; expected NF4G<size> or NF4CH",
        ),
        ("NF4A8", "missing group after NF4"),
        ("NF5G64", "NF5: expected NF3 or NF4"),
        ("NFG64", "NF: expected NF3 or NF4"),
        ("W16G128", "W16 (not quantized) takes no group"),
        ("W9G128", "weight bits 9 out of range 2..=8"),
        ("NF3G64W4", "in the order W, A, KV"),
        ("W4NF3G64", "in the order W, A, KV"),
        ("W4G64CH", "unexpected \"CH\" at position 5"),
    ] {
        let e = err(input);
        assert!(e.starts_with(&format!("invalid scheme {input:?}: ")), "{e}");
        assert!(e.contains(want), "{input}: {e}");
    }
}
