//! Glob patterns over linear-layer names (`layers.3.mlp.up_proj`): `*` matches any run of characters.

/// Whether `pattern` matches all of `name`. `*` matches any (possibly empty) run of characters,
/// dots included, so `layers.0.*` matches every linear layer of block 0 and
/// `layers.*.mlp.down_proj` every down projection. All other characters match themselves
/// (case-sensitive); there are no other wildcards.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    // Greedy matching with backtracking to the last `*` (linear in practice, O(|p|·|n|) worst case).
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None; // (index after '*' in p, index in n it resumes at)
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            pi += 1;
            star = Some((pi, ni));
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn literal_and_star() {
        assert!(glob_match(
            "layers.0.self_attn.q_proj",
            "layers.0.self_attn.q_proj"
        ));
        assert!(!glob_match(
            "layers.0.self_attn.q_proj",
            "layers.0.self_attn.k_proj"
        ));
        // `*` crosses dots.
        assert!(glob_match("layers.0.*", "layers.0.mlp.down_proj"));
        assert!(!glob_match("layers.0.*", "layers.10.mlp.down_proj"));
        assert!(glob_match(
            "layers.*.mlp.down_proj",
            "layers.12.mlp.down_proj"
        ));
        assert!(!glob_match(
            "layers.*.mlp.down_proj",
            "layers.12.mlp.up_proj"
        ));
        assert!(glob_match("*", "layers.1.self_attn.o_proj"));
        assert!(glob_match("*proj", "layers.1.self_attn.o_proj"));
        assert!(glob_match("*.self_attn.*", "layers.4.self_attn.v_proj"));
        assert!(!glob_match("*.self_attn.*", "layers.4.mlp.gate_proj"));
        // `layers.1*` also matches layers.10 ...: documented behavior.
        assert!(glob_match("layers.1*", "layers.10.mlp.up_proj"));
        // Whole-string match: no implicit prefix/suffix.
        assert!(!glob_match("layers.0", "layers.0.mlp.up_proj"));
        assert!(!glob_match("mlp.up_proj", "layers.0.mlp.up_proj"));
        assert!(glob_match("**a**", "a"));
        assert!(!glob_match("", "a"));
        assert!(glob_match("", ""));
    }
}
