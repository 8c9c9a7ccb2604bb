//! Parsing and semantics of `I/N` partitions.

use qat_shards::{Partition, ShardError};

#[test]
fn parses_valid_partitions() {
    let p: Partition = "3/8".parse().unwrap();
    assert_eq!(p, Partition { index: 3, count: 8 });
    assert_eq!(p.to_string(), "3/8");
    assert_eq!("0/1".parse::<Partition>().unwrap(), Partition::single());
    assert_eq!(p.file_indices(20).collect::<Vec<_>>(), vec![3, 11, 19]);
    assert!(p.owns(11) && !p.owns(12));
}

#[test]
fn rejects_invalid_partitions_with_clear_errors() {
    for (s, needle) in [
        ("3/2", "index 3 must be < count 2"),
        ("2/2", "index 2 must be < count 2"),
        ("a/b", "index I \"a\" is not a non-negative integer"),
        ("0/0", "count N must be >= 1"),
        ("1", "missing '/'"),
        ("", "missing '/'"),
        ("-1/2", "not a non-negative integer"),
        (" 0/1", "not a non-negative integer"),
        ("0/1/2", "count N \"1/2\" is not a non-negative integer"),
        ("0/99999999999", "count N \"99999999999\""),
    ] {
        let e = s.parse::<Partition>().unwrap_err();
        assert!(matches!(e, ShardError::InvalidPartition { .. }));
        let msg = e.to_string();
        assert!(msg.contains(needle), "{s:?}: {msg}");
        assert!(
            msg.contains(&format!("{s:?}")),
            "{s:?}: message must quote the input: {msg}"
        );
    }
    assert!(Partition::new(2, 2).is_err());
}
