//! Dense bit packing of integer codes, row by row: the bit order of `formats/packed.md`
//! (section 4), in one place.
//!
//! A row of `n` codes of `b` bits is one little-endian bit stream: code `i` occupies stream bits
//! `[i·b, (i+1)·b)`, least significant bit first, and stream bit `k` is bit `k mod 8` of byte
//! `k / 8`. Every row starts on a byte boundary; the unused high bits of a row's last byte are 0.

/// Bytes one row of `n` codes of `bits` bits takes: `ceil(n · bits / 8)`.
pub fn bytes_per_row(n: usize, bits: u8) -> usize {
    (n * usize::from(bits)).div_ceil(8)
}

/// Packs `codes` (row-major, rows of `row_len` codes, each `< 2^bits`) into rows of
/// [`bytes_per_row`] bytes. Bits of a code above `bits` are dropped, so callers pass codes in
/// range. `bits` must be in `1..=8` and `row_len` must divide `codes.len()`.
pub fn pack_rows(codes: &[u8], row_len: usize, bits: u8) -> Vec<u8> {
    assert!((1..=8).contains(&bits), "bits {bits} out of 1..=8");
    assert!(
        row_len > 0 && codes.len().is_multiple_of(row_len),
        "{} codes are not rows of {row_len}",
        codes.len()
    );
    let bpr = bytes_per_row(row_len, bits);
    let mask = (1u32 << bits) - 1;
    let mut out = Vec::with_capacity(codes.len() / row_len * bpr);
    for row in codes.chunks(row_len) {
        let (mut acc, mut filled) = (0u32, 0u32); // pending bits, LSB first
        for &c in row {
            acc |= (u32::from(c) & mask) << filled;
            filled += u32::from(bits);
            while filled >= 8 {
                out.push(acc as u8);
                acc >>= 8;
                filled -= 8;
            }
        }
        if filled > 0 {
            out.push(acc as u8); // the padding bits above `filled` are 0
        }
    }
    out
}

/// Unpacks one packed row (`bytes_per_row(n, bits)` bytes) into `n` codes appended to `out`.
/// Returns the row's padding bits (the bits after the last code; 0 in a valid file), shifted
/// down so that the first padding bit is bit 0.
pub fn unpack_row(row: &[u8], n: usize, bits: u8, out: &mut Vec<u8>) -> u8 {
    assert!((1..=8).contains(&bits), "bits {bits} out of 1..=8");
    assert_eq!(
        row.len(),
        bytes_per_row(n, bits),
        "row of {n} codes of {bits} bits"
    );
    let mask = (1u32 << bits) - 1;
    let (mut acc, mut filled) = (0u32, 0u32);
    let mut bytes = row.iter();
    for _ in 0..n {
        while filled < u32::from(bits) {
            // Cannot run out: the row has exactly enough bytes for n codes.
            acc |= u32::from(*bytes.next().unwrap_or(&0)) << filled;
            filled += 8;
        }
        out.push((acc & mask) as u8);
        acc >>= bits;
        filled -= u32::from(bits);
    }
    acc as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random code stream (xorshift), masked to `bits`.
    fn codes(n: usize, bits: u8, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x as u8) & ((1u16 << bits) - 1) as u8
            })
            .collect()
    }

    #[test]
    fn round_trips_every_width_and_odd_row_lengths() {
        for bits in 1..=8u8 {
            for row_len in [1, 2, 3, 5, 7, 8, 43, 64, 172] {
                let c = codes(row_len * 3, bits, u64::from(bits) * 1000 + row_len as u64);
                let packed = pack_rows(&c, row_len, bits);
                let bpr = bytes_per_row(row_len, bits);
                assert_eq!(packed.len(), 3 * bpr);
                let mut back = Vec::new();
                for row in packed.chunks(bpr) {
                    assert_eq!(
                        unpack_row(row, row_len, bits, &mut back),
                        0,
                        "padding of {bits}-bit row of {row_len}"
                    );
                }
                assert_eq!(back, c, "{bits} bits, rows of {row_len}");
            }
        }
    }

    #[test]
    fn bit_order_is_lsb_first_across_bytes() {
        // 3 bits: c0 = 0b101, c1 = 0b011, c2 = 0b110 -> stream 101 110 011 (LSB first per code)
        // byte 0 = c0 | c1 << 3 | (c2 & 0b11) << 6 = 0b10_011_101, byte 1 = c2 >> 2 = 0b1.
        assert_eq!(
            pack_rows(&[0b101, 0b011, 0b110], 3, 3),
            vec![0b1001_1101, 0b0000_0001]
        );
        // 4 bits: low nibble first.
        assert_eq!(pack_rows(&[0x1, 0xf, 0x7], 3, 4), vec![0xf1, 0x07]);
        // 2 bits: four codes per byte, rows padded separately.
        assert_eq!(
            pack_rows(&[1, 2, 3, 0, 3, 1], 3, 2),
            vec![0b11_10_01, 0b01_11_00]
        );
        assert_eq!(bytes_per_row(172, 3), 65); // 516 bits: 4 padding bits
    }

    #[test]
    fn padding_bits_are_reported() {
        let mut out = Vec::new();
        // 3 codes of 3 bits = 9 bits in 2 bytes: 7 padding bits, here 0b1000000 set.
        assert_eq!(unpack_row(&[0, 0b1000_0000], 3, 3, &mut out), 0b100_0000);
        assert_eq!(out, vec![0, 0, 0]);
    }
}
