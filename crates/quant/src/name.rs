//! Short scheme names for shell users (`W4A8KV4`, `W3G128`, `NF3G64A8`, `FP`): parsing and
//! canonical formatting.
//!
//! Grammar (case-insensitive, surrounding whitespace ignored):
//!
//! ```text
//! name   := "FP" | "NONE" | [ weight ] [ "A" bits ] [ "KV" bits [ "H" ] ]   (at least one part, in this order)
//! weight := "W" bits [ group ] | "NF3" group | "NF4" group | "Q4_0" | "Q4_1" | "Q8_0"
//! group  := "G" size | "CH"                                          (size >= 1; CH = per output channel)
//! bits   := 2..=8 | 16                                               (16 = not quantized)
//! ```
//!
//! `W<b>` is symmetric per-channel weights (LLM-QAT), `W<b>G<n>` asymmetric MinMax per group of
//! n inputs and `W<b>CH` asymmetric per output channel (BitDistiller `asym_group`), `NF3…`/`NF4…`
//! the NormalFloat grids, `Q4_0`/`Q4_1`/`Q8_0` llama.cpp's GGUF blocks; `A` per-token activations, `KV` the per-token KV cache
//! (LLM-QAT: one scale per token over all KV heads), `KV<b>H` one scale per token and KV head.
//! [`Scheme`]'s `Display` writes the canonical name (quantized parts only, `FP` if none) when the
//! scheme has one, and compact JSON otherwise; `FromStr` accepts both, so they round-trip.

use crate::error::{QuantError, Result};
use crate::ggml::GgmlType;
use crate::scheme::{ActQuant, KvGranularity, KvQuant, Scheme, MAX_BITS, MIN_BITS};
use crate::weight::{WeightFormat, WeightQuant};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// Bit width meaning "not quantized" in short names.
pub const UNQUANTIZED_BITS: u32 = 16;

const EXPECTED: &str =
    "expected FP, none or [W<bits>[G<size>|CH] | NF3G<size> | NF4G<size> | Q4_0 | Q4_1 | Q8_0][A<bits>][KV<bits>[H]] \
     with bits in 2..=8 or 16 (= not quantized), e.g. W4A8KV4, W8A8, W4, W3G128, NF3G64A8, W4A8KV4H";

/// One `<letter><bits>` part: `None` if 16 (not quantized), `Some(bits)` if in range.
fn part_bits(quantizer: &str, digits: &str) -> std::result::Result<Option<u8>, String> {
    if digits.is_empty() {
        return Err(format!(
            "missing bit width after {}; {EXPECTED}",
            quantizer_letter(quantizer)
        ));
    }
    let bits: u32 = digits
        .parse()
        .map_err(|_| format!("{quantizer} bits {digits} out of range {MIN_BITS}..={MAX_BITS}"))?;
    if bits == UNQUANTIZED_BITS {
        return Ok(None);
    }
    match u8::try_from(bits) {
        Ok(b) if (MIN_BITS..=MAX_BITS).contains(&b) => Ok(Some(b)),
        _ => Err(format!(
            "{quantizer} bits {bits} out of range {MIN_BITS}..={MAX_BITS}"
        )),
    }
}

fn quantizer_letter(quantizer: &str) -> &'static str {
    match quantizer {
        "weight" => "\"W\"",
        "activation" => "\"A\"",
        _ => "\"KV\"",
    }
}

/// Splits the leading ASCII digits off `s`.
fn digits(s: &str) -> (&str, &str) {
    s.split_at(s.bytes().take_while(u8::is_ascii_digit).count())
}

/// An optional group part (`G<size>` or `CH`) at the start of `rest`: `Ok(None)` if absent,
/// `Ok(Some(group_size))` (`None` = per channel) if present, with the rest of the input.
#[allow(clippy::type_complexity)]
fn group_part(rest: &str) -> std::result::Result<(Option<Option<usize>>, &str), String> {
    if let Some(r) = rest.strip_prefix("CH") {
        return Ok((Some(None), r));
    }
    let Some(r) = rest.strip_prefix('G') else {
        return Ok((None, rest));
    };
    let (size, r) = digits(r);
    match size.parse::<usize>() {
        _ if size.is_empty() => Err("missing group size after \"G\" \
             (expected G<size> with size >= 1, e.g. G128, or CH for per channel)"
            .to_string()),
        Ok(0) => Err("group size 0 (expected >= 1, or CH for per channel)".to_string()),
        Ok(g) => Ok((Some(Some(g)), r)),
        Err(_) => Err(format!("group size {size} too large")),
    }
}

/// The weight part after its prefix (`W` or `NF`): the quantizer (`None` = not quantized) and
/// the rest of the input.
fn weight_part<'a>(
    prefix: &str,
    rest: &'a str,
) -> std::result::Result<(Option<WeightQuant>, &'a str), String> {
    let (d, rest) = digits(rest);
    if prefix == "Q" {
        let (variant, rest) = match rest.strip_prefix('_') {
            Some(r) => digits(r),
            None => ("", rest),
        };
        let name = format!("q{d}_{variant}");
        let ty = GgmlType::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| {
                format!(
                    "Q{d}_{variant}: expected Q4_0, Q4_1 or Q8_0 (llama.cpp's GGUF blocks of 32)"
                )
            })?;
        return Ok((Some(WeightQuant::ggml(ty)), rest));
    }
    let (group, rest) = group_part(rest)?;
    if prefix == "NF" {
        let format = match d {
            "3" => |group_size| WeightFormat::Nf3 { group_size },
            "4" => |group_size| WeightFormat::Nf4 { group_size },
            _ => return Err(format!("NF{d}: expected NF3 or NF4")),
        };
        let group_size = group.ok_or_else(|| {
            format!("missing group after NF{d}; expected NF{d}G<size> or NF{d}CH, e.g. NF{d}G64")
        })?;
        let format = format(group_size);
        return Ok((
            Some(WeightQuant::new(
                format.required_bits().unwrap_or(0),
                format,
            )),
            rest,
        ));
    }
    let bits = part_bits("weight", d)?;
    let wq = match (bits, group) {
        (None, None) => None,
        (None, Some(_)) => return Err("W16 (not quantized) takes no group".to_string()),
        (Some(b), None) => Some(WeightQuant::sym_per_channel(b)),
        (Some(b), Some(group_size)) => Some(WeightQuant::asym_group(b, group_size)),
    };
    Ok((wq, rest))
}

/// The parts of a short name: weight, activation bits, KV quantizer.
type Parts = (Option<WeightQuant>, Option<u8>, Option<KvQuant>);

/// Parses a trimmed short name (not JSON); the error is the reason only.
fn parse_short(name: &str) -> std::result::Result<Parts, String> {
    // ASCII upper-casing keeps byte offsets, so positions index `name` too.
    let upper = name.to_ascii_uppercase();
    let upper = upper.as_str();
    if upper == "FP" || upper == "NONE" {
        return Ok((None, None, None));
    }
    if upper.is_empty() {
        return Err(format!("empty name; {EXPECTED}"));
    }
    // Parts in order; each is (prefix, quantizer name, slot). W and NF fill the same slot.
    const PARTS: [(&str, &str, usize); 5] = [
        ("W", "weight", 0),
        ("NF", "weight", 0),
        ("Q", "weight", 0),
        ("A", "activation", 1),
        ("KV", "kv", 2),
    ];
    let (mut weight, mut bits, mut kv_per_head) = (None, [None; 2], false);
    let mut rest = upper;
    let mut next_slot = 0;
    while !rest.is_empty() {
        let pos = upper.len() - rest.len();
        let found = PARTS
            .iter()
            .find(|(prefix, _, slot)| *slot >= next_slot && rest.starts_with(prefix));
        let Some(&(prefix, quantizer, slot)) = found else {
            let seen_earlier = PARTS
                .iter()
                .any(|(p, _, slot)| *slot < next_slot && rest.starts_with(p));
            let why = if seen_earlier {
                "parts must appear once each, in the order W, A, KV"
            } else {
                EXPECTED
            };
            return Err(format!(
                "unexpected {:?} at position {pos}; {why}",
                &name[pos..]
            ));
        };
        rest = &rest[prefix.len()..];
        if slot == 0 {
            (weight, rest) = weight_part(prefix, rest)?;
        } else {
            let (d, r) = digits(rest);
            bits[slot - 1] = part_bits(quantizer, d)?;
            rest = r;
            if slot == 2 {
                if let Some(r) = rest.strip_prefix('H') {
                    if bits[1].is_none() {
                        return Err(
                            "\"H\" after KV16: per-head KV scales need a quantized KV cache".into(),
                        );
                    }
                    kv_per_head = true;
                    rest = r;
                }
            }
        }
        next_slot = slot + 1;
    }
    let kv = bits[1].map(|b| {
        if kv_per_head {
            KvQuant::per_head(b)
        } else {
            KvQuant::per_token(b)
        }
    });
    Ok((weight, bits[0], kv))
}

/// The short-name weight part of `w`, if it has one (default gradient, bits the format allows).
fn weight_name(w: &WeightQuant) -> Option<String> {
    if w.grad != w.format.default_grad() || w.check("").is_err() {
        return None;
    }
    let group = |g: Option<usize>| g.map_or("CH".to_string(), |g| format!("G{g}"));
    Some(match w.format {
        WeightFormat::SymPerChannel => format!("W{}", w.bits),
        WeightFormat::AsymGroup { group_size } => format!("W{}{}", w.bits, group(group_size)),
        WeightFormat::Nf3 { group_size } => format!("NF3{}", group(group_size)),
        WeightFormat::Nf4 { group_size } => format!("NF4{}", group(group_size)),
        WeightFormat::Ggml(t) => t.name().to_ascii_uppercase(),
    })
}

impl Scheme {
    /// The canonical short name (`W4A8KV4`, `W3G128`, `FP`), or `None` if the scheme has
    /// overrides or a weight quantizer that short names cannot express (a non-default `grad`).
    pub fn short_name(&self) -> Option<String> {
        if !self.overrides.is_empty() {
            return None;
        }
        let mut s = String::new();
        if let Some(w) = &self.weight {
            s.push_str(&weight_name(w)?);
        }
        if let Some(a) = &self.act {
            s.push_str(&format!("A{}", a.bits));
        }
        if let Some(kv) = &self.kv {
            s.push_str(&format!("KV{}", kv.bits));
            if kv.granularity == KvGranularity::Head {
                s.push('H');
            }
        }
        Some(if s.is_empty() { "FP".to_string() } else { s })
    }
}

impl fmt::Display for Scheme {
    /// The canonical short name, or compact JSON when there is none (both parse back).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.short_name() {
            Some(name) => f.write_str(&name),
            None => f.write_str(&serde_json::to_string(self).map_err(|_| fmt::Error)?),
        }
    }
}

impl FromStr for Scheme {
    type Err = QuantError;

    /// A short name (case-insensitive) or inline JSON (starting with `{`); the result is validated.
    fn from_str(s: &str) -> Result<Self> {
        let trimmed = s.trim();
        if trimmed.starts_with('{') {
            return Scheme::from_json_str(trimmed, Path::new(""));
        }
        let (w, a, kv) = parse_short(trimmed).map_err(|what| QuantError::InvalidName {
            input: s.to_string(),
            what,
        })?;
        Ok(Scheme::new(w, a.map(|bits| ActQuant { bits }), kv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Scheme {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn short_names_parse_to_expected_schemes() {
        let w4 = Some(WeightQuant::sym_per_channel(4));
        assert_eq!(
            parse("W4A8KV4"),
            Scheme::new(w4, Some(ActQuant { bits: 8 }), Some(KvQuant::per_token(4)))
        );
        assert_eq!(
            parse("w4a8kv8"),
            Scheme::new(w4, Some(ActQuant { bits: 8 }), Some(KvQuant::per_token(8)))
        );
        assert_eq!(parse("W4"), Scheme::new(w4, None, None));
        assert_eq!(parse("W4A16KV16"), Scheme::new(w4, None, None));
        assert_eq!(
            parse("W8A8"),
            Scheme::new(
                Some(WeightQuant::sym_per_channel(8)),
                Some(ActQuant { bits: 8 }),
                None
            )
        );
        assert_eq!(parse("FP"), Scheme::full_precision());
        assert_eq!(parse(" none "), Scheme::full_precision());
        assert_eq!(parse("W16A16KV16"), Scheme::full_precision());
        assert_eq!(
            parse("A8KV4"),
            Scheme::new(
                None,
                Some(ActQuant { bits: 8 }),
                Some(KvQuant::per_token(4))
            )
        );
        assert_eq!(
            parse("w4a8kv4h"),
            Scheme::new(w4, Some(ActQuant { bits: 8 }), Some(KvQuant::per_head(4)))
        );
    }

    #[test]
    fn display_is_canonical_and_round_trips() {
        for (input, canonical) in [
            ("W4A8KV4", "W4A8KV4"),
            ("w4a8kv8", "W4A8KV8"),
            ("W4", "W4"),
            ("W8A8", "W8A8"),
            ("W4A16KV16", "W4"),
            ("W16A8", "A8"),
            ("fp", "FP"),
            ("NONE", "FP"),
            ("W2A4KV2", "W2A4KV2"),
            ("w4a8kv4h", "W4A8KV4H"),
            ("KV2H", "KV2H"),
        ] {
            let s = parse(input);
            assert_eq!(s.to_string(), canonical, "{input}");
            assert_eq!(parse(canonical), s, "{input}");
        }
    }

    #[test]
    fn invalid_names_explain_themselves() {
        let err = |s: &str| s.parse::<Scheme>().unwrap_err().to_string();
        assert_eq!(
            err("W9"),
            "invalid scheme \"W9\": weight bits 9 out of range 2..=8"
        );
        assert_eq!(
            err("W4A1"),
            "invalid scheme \"W4A1\": activation bits 1 out of range 2..=8"
        );
        assert_eq!(
            err("W4A8KV32"),
            "invalid scheme \"W4A8KV32\": kv bits 32 out of range 2..=8"
        );
        assert_eq!(
            err("W99999999999"),
            "invalid scheme \"W99999999999\": weight bits 99999999999 out of range 2..=8"
        );
        assert!(
            err("W").contains("missing bit width after \"W\""),
            "{}",
            err("W")
        );
        assert!(
            err("W4X8").contains("unexpected \"X8\" at position 2"),
            "{}",
            err("W4X8")
        );
        assert!(
            err("A8W4").contains("in the order W, A, KV"),
            "{}",
            err("A8W4")
        );
        assert!(
            err("W4W4").contains("in the order W, A, KV"),
            "{}",
            err("W4W4")
        );
        assert!(err("").contains("empty name"), "{}", err(""));
        assert!(
            err("W4KV16H")
                .contains("\"H\" after KV16: per-head KV scales need a quantized KV cache"),
            "{}",
            err("W4KV16H")
        );
        assert!(
            err("W4KV4HH").contains("unexpected \"H\" at position 6"),
            "{}",
            err("W4KV4HH")
        );
        assert!(err("int4").starts_with(
            "invalid scheme \"int4\": unexpected \"int4\" at position 0; expected FP"
        ));
    }
}
